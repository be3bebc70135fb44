"""The simulation: settings, the runner, and the engines that run the device programs (in-process, processes, Ray)."""
