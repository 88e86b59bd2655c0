"""Reading and writing files: the one place for each file format and mechanism depthcut needs. The
bottom layer: it imports no other depthcut package.

- `text`: UTF-8 text and JSON Lines with line-numbered errors; `data`: the DATA argument (files,
  folders, Hugging Face datasets, named corpora) as documents.
- `safetensors`: safetensors headers (checked), one tensor read by plain file reads, files written
  a tensor at a time (copied bytes or in-memory tensors); the dtype table.
- `gguf_files`: a GGUF model (one file or a split) opened and checked, tensor bytes copied or read
  one tensor at a time; `gguf_writer`: a GGUF file written through gguf-py's public writer API.
- `model_files`: a model folder's files (regular files inside it, checked, opened and copied in one
  place); `model_folder`: a Hugging Face folder saved whole; `model_card`: its README.md
  (huggingface_hub's `ModelCard`); `provenance`: the depthcut.json schema.
- `atomic`: outputs that appear whole or not at all, on top of `claims` (one writer per --out),
  `output_checks` (--out checked before any work, never over an input; free space),
  `temporaries` (the siblings' names, stale ones removed) and `signals` (SIGTERM and SIGHUP as
  Ctrl-C; a publish is not cut short); `settings`: the "made with other settings" check of
  resumable outputs.
"""
