"""FEALLM model parts (paper section 4), pure PyTorch, no llava import.

- `config.FeallmConfig`: every architecture number, read from / written to the LLaVA
  config as `mm_feallm_*` attributes.
- `deformable`: `ms_deform_attn` (Deformable-DETR signature) and `DeformableAttention`.
- `lca.LocalClueAggregator`: 16 directional face crops -> one LLM token + 16 local keys.
- `mpp.MultiPerspectiveProjector`: deep <- shallow layers, <- local keys, self, MLP.
- `projector.FeallmProjector`: LCA + MPP, the module llava holds as `mm_projector`;
  `projector.TowerFeatures` is what the vision tower hands it.

Nothing is imported here so that `import feallm_llava.model.config` stays cheap.
"""
