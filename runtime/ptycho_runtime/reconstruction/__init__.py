"""From predicted patches to an object: geometry, grouping, input checks, stitching, phase alignment.

Pure numpy, no bundle: everything here works on arrays and positions, so the
training side (``ptycho_export``) and every inference path share one
definition of the object grid, the frame centre and the stitching weights.
"""
