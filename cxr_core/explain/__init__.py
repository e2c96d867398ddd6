"""Showing why: CAMs and their faithfulness, overlays, comparison grids, charts, the film viewer and exports."""
