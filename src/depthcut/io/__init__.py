"""Reading and writing files: the one place for each file mechanism depthcut needs.

- `depthcut.io.text`: UTF-8 text and JSON Lines with line-numbered errors.
- `depthcut.io.settings`: the "made with other settings" check shared by resumable outputs.
- `depthcut.io.safetensors`: safetensors headers (checked), one tensor read by plain file reads,
  files written a tensor at a time (copied bytes or in-memory tensors); the dtype table.
- `depthcut.io.atomic`: outputs that appear whole or not at all (temporary siblings, atomic
  publish, write failures as one clear error), on top of `depthcut.io.claims` (one writer per
  --out), `depthcut.io.output_checks` (--out checked before any work, never over an input),
  `depthcut.io.temporaries` (the siblings' names, stale ones removed) and `depthcut.io.signals`
  (a publish is not cut short).
- `depthcut.io.skeleton`: a model built from its config with no weights (meta parameters).
- `depthcut.io.model_files`: a model folder's files (regular files inside it: checked, opened and
  copied in one place) and the names of files read from files (plain names in the same folder).
"""
