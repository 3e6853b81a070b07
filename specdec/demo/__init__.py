"""The side-by-side demo: `build_demo()` returns the gradio Blocks; `specdec demo` launches it.

Boundary: top of the edge layer; gradio is imported only when the page is built.
"""

from specdec.demo.app import build_demo

__all__ = ["build_demo"]
