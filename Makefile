# The README's two commands: `make run` and `make test` (each sets up first).
PROMPT ?= Summarize the plot of Romeo and Juliet in three sentences, then list the main characters.

.PHONY: setup setup-qwen run test test-fast bench

setup:
	bash scripts/setup.sh

setup-qwen:
	SPECDEC_QWEN=1 bash scripts/setup.sh

run: setup
	python3 -m specdec generate --model smollm2-135m --drafter prompt-lookup --compare --threads 2 "$(PROMPT)"

test: setup
	python3 -m pytest -q

test-fast:
	python3 -m pytest -q -m "not slow"

bench: setup
	python3 -m specdec bench --model smollm2-135m --threads 2 --per-category 2 \
	  --methods baseline,hf-prompt-lookup,prompt-lookup,prompt-lookup-tree
