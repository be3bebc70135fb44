"""Picture of a topology: peers in the disc, links, clusters coloured, collision rate per cluster in the legend."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import networkx as nx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle

from sorlora_gossip.topology import clusters

__all__ = ["plot_topology"]


def plot_topology(g: nx.Graph, path: str | Path, *, title: str | None = None, radius: float | None = None) -> Path:
    """Draw ``g`` to a PNG at ``path``: nodes at their ``pos`` (circular layout if absent), coloured by cluster.

    The legend gives each cluster's size and, when the graph has a ``collision_rate`` attribute (from
    ``cluster_topology``), its collision rate S. The disc of ``radius`` (default: the graph's channel radius when
    positions are known) is outlined. Returns the path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot_topology writes PNG files; got {path.name!r}")
    has_pos = g.number_of_nodes() > 0 and all("pos" in g.nodes[v] for v in g)
    pos = {v: g.nodes[v]["pos"] for v in g} if has_pos else nx.circular_layout(g)
    groups = clusters(g)
    rates = g.graph.get("collision_rate", {})
    cmap = matplotlib.colormaps["tab20" if len(groups) > 10 else "tab10"]

    fig = Figure(figsize=(6.5, 6.0), dpi=120)
    FigureCanvasAgg(fig)  # Agg canvas on this figure only: no global backend switch, no pyplot state
    ax = fig.add_subplot()
    if has_pos:
        channel = g.graph.get("channel")
        r = radius if radius is not None else (channel.radius_m if channel is not None else None)
        if r is not None:
            ax.add_patch(Circle((0.0, 0.0), r, fill=False, linestyle="--", edgecolor="0.6"))
            ax.set_xlim(-1.08 * r, 1.08 * r)
            ax.set_ylim(-1.08 * r, 1.08 * r)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color="0.55", width=1.0)
    handles = []
    ids = sorted({c for _, c in g.nodes(data="cluster")})
    for k, (c, members) in enumerate(zip(ids, groups)):
        colour = cmap(k % cmap.N)
        nx.draw_networkx_nodes(g, pos, nodelist=sorted(members), node_color=[colour], node_size=260, ax=ax)
        label = f"cluster {c}: {len(members)} peers"
        if c in rates:
            label += f", S = {rates[c]:.3f}"
        handles.append(Line2D([], [], marker="o", linestyle="", color=colour, markersize=9, label=label))
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=8)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if has_pos:  # networkx hides the axes' ticks; positions are in metres, so show them
        ax.tick_params(left=True, bottom=True, labelleft=True, labelbottom=True)
    ax.set_aspect("equal")
    ax.set_title(title or f"{g.graph.get('kind', 'topology')} topology, {g.number_of_nodes()} peers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
