# The README's commands: `make demo`, `make run` and `make test` (each sets up first).
# A text-editing prompt: the answer copies much of the prompt, which is where prompt lookup shines.
PROMPT ?= Fix the typos in this text and return it in full: 'The quick brwon fox jumpd over the lazzy dog. The dog was sleepping in the sun, and the fox ran quikly into the forrest where it lived with its famly.'

.PHONY: setup setup-qwen demo run test test-fast bench

setup:
	bash scripts/setup.sh

setup-qwen:
	SPECDEC_QWEN=1 bash scripts/setup.sh

demo: setup
	python3 -m specdec demo --model smollm2-135m --threads 2

run: setup
	python3 -m specdec generate --model smollm2-135m --drafter prompt-lookup --compare --threads 2 "$(PROMPT)"

test: setup
	python3 -m pytest -q

test-fast:
	python3 -m pytest -q -m "not slow"

bench: setup
	python3 -m specdec bench --model smollm2-135m --threads 2 --per-category 2 \
	  --methods baseline,hf-prompt-lookup,prompt-lookup,prompt-lookup-tree --out bench-out/$$(date +%Y%m%d-%H%M%S)
