# The two commands of the README. Both set themselves up (scripts/setup.sh) on a fresh machine.
.PHONY: up test setup lock lint

up: setup          ## embedded NATS + 2 engines (SmolLM2) + router + OpenAI front on :8000
	.venv/bin/busserve up $(ARGS)

test: setup        ## the whole test suite (what .ci/run runs)
	.venv/bin/python -m pytest $(ARGS)

setup:             ## .venv from the lock (requirements-cpu.lock; BUSSERVE_TORCH=gpu for the CUDA one)
	@scripts/setup.sh

lock: setup        ## regenerate requirements-*.lock from pyproject.toml and constraints/ (ARGS=--upgrade to move pins)
	scripts/lock.sh $(ARGS)

lint: setup
	.venv/bin/ruff check busserve tests
	.venv/bin/mypy busserve
