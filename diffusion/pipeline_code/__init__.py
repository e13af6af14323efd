"""Files shipped inside exports: each is self-contained (torch and diffusers only).

`edm_pipeline.py` becomes `pipeline.py` in every EDM export folder.
"""
