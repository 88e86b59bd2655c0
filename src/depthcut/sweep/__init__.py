"""The paper's experiment end to end: drop counts x strategies x repairs x healed or not (`run`), every
point appended to results.jsonl (`results`), progress (`progress`), then figures (`figures`) and
report.html (`report`, rendered from templates/report.html.j2)."""
