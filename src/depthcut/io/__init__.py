"""Reading and writing files: the one place for each file mechanism depthcut needs.

- `depthcut.io.text`: UTF-8 text and JSON Lines with line-numbered errors.
- `depthcut.io.settings`: the "made with other settings" check shared by resumable outputs.
"""
