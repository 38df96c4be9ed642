"""FEALLM model parts (paper section 4), pure PyTorch, no llava import.

- `config.FeallmConfig`: every architecture number, read from / written to the LLaVA
  config as `mm_feallm_*` attributes.
- `deformable`: `ms_deform_attn` (Deformable-DETR signature) and `DeformableAttention`.
- `lca.LocalClueAggregator`: 16 directional face crops -> one LLM token + 16 local keys.
- `mpp.MultiPerspectiveProjector`: deep <- shallow layers, <- local keys, self, MLP.
- `projector.FeallmProjector`: LCA + MPP, the module llava holds as `mm_projector`.
- `features.TowerFeatures`: what a CLIP tower hands it (deep, shallow layers, pixels),
  read off any CLIP's hidden states by `features.tower_features`.
- `weights`: the weight files of upstream's training, read without unpickling code.
- `fused`: the residual update as one matmul, oneDNN's linear on a CPU at inference.
- `graphs`: the projector's inference forward replayed from CUDA graphs (opt-in).

Nothing is imported here so that `import feallm_llava.model.config` stays cheap.
"""
