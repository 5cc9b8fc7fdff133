"""The evaluation crop ratio, the one owner of the paper's validation preprocessing constant.

ImageNet evaluation resizes the short side to ``floor(r / VAL_CROP_RATIO)`` and center-crops ``r`` (224 of 256, as
timm's ``crop_pct``). The FFCV val loader (:mod:`rat.data.loaders`), the folder evaluation (:mod:`rat.eval.data`) and
the models' default cfgs (``crop_pct``) read it from here; the module imports nothing, so reading it costs no ffcv.
"""
VAL_CROP_RATIO = 224 / 256
