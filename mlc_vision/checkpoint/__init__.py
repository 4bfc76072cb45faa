"""Hugging Face checkpoint -> (VisionConfig, preprocessing, projector, weight plan).

- :mod:`.source`: where the checkpoint is (a directory or a hub id) and which
  of its files hold the weights we read.
- :mod:`.layouts`: composite ``config.json`` files (CLIP/SigLIP full models,
  LLaVA, LLaVA-OneVision, InternVL-chat): the tower's config and the options
  the outer config sets (select layer, feature, projector).
- :mod:`.projector`: the projector a composite config describes.
- :mod:`.processor`: ``preprocessor_config.json`` -> ``Preprocess``.
- :mod:`.config`: all of the above -> family + ``VisionConfig``.
- :mod:`.weight_plan`: checkpoint key -> parameter name, or skipped.
- :mod:`.resolve`: ``--model`` (preset, directory or hub id) -> ``VisionConfig``.

``compile`` reaches a checkpoint's config through here without the weight
converter, and nothing here imports the runtime.
"""
