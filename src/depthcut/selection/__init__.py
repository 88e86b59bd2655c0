"""How `depthcut shrink` chooses: the candidate options and the do-no-harm decision (`decision`), the
training-free repairs of every candidate (`fits`), the search on the output (`search`), the layer-major
scoring of a model never loaded whole (`layer_major`) and the decision table as printed (`decision_table`). The
command itself (check, plan, execute, write) is `depthcut.pipeline.shrink`."""
