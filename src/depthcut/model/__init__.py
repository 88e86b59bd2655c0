"""The model: loading it (`loading`), finding its decoder layer stack (`layers`), removing layers
(`surgery`, with the config rules of `layer_fields` and the layer-kind checks of `layer_kinds`),
dtype choice (`precision`), shard-by-shard surgery on a safetensors folder (`shards`), a weightless
skeleton (`skeleton`), and the processes of a data-parallel run (`distributed`)."""
