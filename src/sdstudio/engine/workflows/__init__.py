"""Request-level workflows built on Engine.generate: the X/Y/Z plot (xyz.py, xyz_grid.py), chaining
(chain.py) and outpainting (outpaint.py)."""
