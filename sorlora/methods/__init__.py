"""What a method is: its spec (one table entry), its adapter kind, and its aggregation and forward rules."""
