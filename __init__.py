"""ComfyUI entry point: registers this pack's nodes and its frontend (web/). Nothing else happens here.

Importing the package without ComfyUI (tools, tests) registers nothing instead of failing.
"""

try:
    import folder_paths  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
else:
    from .glue import NODE_CLASS_MAPPINGS  # v3 nodes: display names are in their schemas

WEB_DIRECTORY = "./web"  # the live loss chart and the nodes' text results, served by ComfyUI to its frontend

__all__ = ["NODE_CLASS_MAPPINGS", "WEB_DIRECTORY"]
