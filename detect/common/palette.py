"""The one colour palette, matplotlib's tab10: RGB for OpenCV drawings, hex for figures."""

TAB10_RGB = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
             (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
TAB10_HEX = tuple(f"#{r:02x}{g:02x}{b:02x}" for r, g, b in TAB10_RGB)
