"""cxr_core: the library behind the cxr chest X-ray decision-support app.

Reading images (:mod:`cxr_core.imaging.io`), model folders (:mod:`cxr_core.models.loading`),
inference (:mod:`cxr_core.inference`) and explanations (:mod:`cxr_core.explain.cam`).
Never imports streamlit: pages call into it and render its frozen dataclasses.
"""

__version__ = "0.1.0"
