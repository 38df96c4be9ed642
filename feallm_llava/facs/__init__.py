"""The ground floor: FACS vocabulary and the one text parser, shared by every layer.

- `labels`: the 7 expressions and 12 AUs FEALLM works in, FACS names, prototypes.
- `parse`: generated text -> an expression and a set of AUs. Data validation, scoring,
  photo analysis and the demo all read text with it, so they agree on what it means.
"""
