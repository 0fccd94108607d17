"""Cells as the words of a slide: detect, measure, import and export nuclei.

    CellTable        one row per nucleus: centroid (um), features (FEATURE_NAMES), coarse type
                     (CELL_TYPES), outline (px of the frame), mpp and the frame's level-0 origin
    measure_nuclei   an instance map + the RGB image -> CellTable (shape, stain, texture, type)
    detect_nuclei    an RGB H&E image -> CellTable, on the CPU, no learned weights
    importers        QuPath GeoJSON, HoVer-Net JSON, CellViT JSON/GeoJSON -> CellTable
    qupath           CellTable -> QuPath GeoJSON (``CellTable.to_geojson``)

Submodules import OpenCV; this package's ``__init__`` imports only the table.
"""

from xmag.cells.table import CELL_TYPES, FEATURE_NAMES, CellTable

__all__ = ["CELL_TYPES", "FEATURE_NAMES", "CellTable"]
