"""The cascade: a cell-level model (CellEcoNet) run after the 5x pass on the regions it picks.

A model package whose card has a ``cascade`` section (``xmag.package.CascadeSpec``) is served by
the same engine, CLI and service: the 5x pass runs as for any package, then ``Cascade.run``
picks K regions from it (``select``), reads only those at cell resolution through the tile
reader, detects nuclei (``xmag.cells``), turns them into words (``vocabulary``) and sentences
(``sentences``), runs the context model's ONNX graph, and writes cells.geojson and
cascade_heatmap.png (``files``). Design: docs/celleconet.md, "The cascade" and "Serving".
"""

from xmag.cascade.runner import Cascade, CascadeOutcome

__all__ = ["Cascade", "CascadeOutcome"]
