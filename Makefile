# llmfleet: the two commands of the README are `make lab` and `make test`.
# Everything a fresh machine needs is installed from here: Debian packages for the lab, the
# hash-locked control-node venv, the pinned artifacts (verified), the lab hosts.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python3.12) $(shell command -v python3.12 2>/dev/null))
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export LLMFLEET_CACHE ?= $(HOME)/.cache/llmfleet
export ANSIBLE_CONFIG := $(abspath ansible.cfg)
export LLMFLEET_LAB_DIR := $(abspath .lab)
export MOLECULE_GLOB := tests/molecule/*/molecule.yml
INVENTORY ?= inventory/lab
# Debian packages the control node needs for the lab (nspawn hosts, their network, debootstrap)
HOST_PACKAGES := systemd-container debootstrap iptables iproute2 openssh-client

.PHONY: help lab setup host-packages venv fetch lab-up lab-down deploy plan test lint unit integration molecule fleet clean \
	lab-guard-start lab-guard-check

help:
	@echo "make lab    set up this machine, fetch the pinned artifacts, boot the lab hosts and roll them out"
	@echo "make test   everything CI runs: lint, unit, integration (real CPU vLLM), molecule (driver; lab on"
	@echo "            hosts mlab1-2: full rollout + checks), fleet (four hosts, two sites: rollouts, canary,"
	@echo "            rollback, mirrors, bundles, repair, gc); each part alone: make lint|unit|integration|molecule|fleet"
	@echo "make plan   print the lab inventory's plan;  make lab-down   stop the lab hosts"

## The README's first command: everything from a fresh machine to a verified lab fleet.
lab: setup fetch lab-up deploy

setup: host-packages venv

host-packages:
	@missing=(); for p in $(HOST_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing+=($$p); done; \
	if [ $${#missing[@]} -gt 0 ]; then \
	  echo "host packages: installing $${missing[*]}"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$${missing[@]}"; \
	fi

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements/control.txt pyproject.toml
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found (ansible-core 2.21 needs >= 3.12): install it or set PY312=/path/to/python3.12"; exit 1; }
	@echo "venv: creating $(VENV) and installing requirements/control.txt (hash-locked; a few minutes the first time)"
	$(PY312) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off --disable-pip-version-check --require-hashes -r requirements/control.txt
	touch $@

## Make the cache hold every pinned artifact the inventory uses, hash-verified.
fetch: venv
	$(BIN)/python tools/pin.py fetch -i $(INVENTORY)

lab-up: venv
	$(BIN)/python tools/lab.py up -i $(INVENTORY)/hosts.yml

lab-down: venv
	$(BIN)/python tools/lab.py down -i $(INVENTORY)/hosts.yml

deploy: venv
	@case "$(INVENTORY)" in inventory/lab*) $(BIN)/python tools/lab.py status --check -i $(INVENTORY)/hosts.yml ;; esac
	$(BIN)/ansible-playbook -i $(INVENTORY) site.yml

plan: venv
	$(BIN)/python tools/plan.py -i $(INVENTORY)

## The README's second command (and .ci/run): lint, unit tests, the lab scenario.
## The scenarios boot hosts of their own: the README's lab (inventory/lab) is left as it was found,
## which lab-guard checks (it boots the lab's hosts when they are down, and stops them again after).
test: setup fetch lint unit integration lab-guard-start molecule fleet lab-guard-check

lab-guard-start: venv
	$(BIN)/python tests/lab_guard.py start -i inventory/lab/hosts.yml

lab-guard-check: venv
	$(BIN)/python tests/lab_guard.py check -i inventory/lab/hosts.yml

lint: venv
	$(BIN)/ruff check tools tests plugins library bench roles/*/library callback_plugins
	$(BIN)/mypy
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint

unit: venv
	$(BIN)/python -m pytest tests/unit

## Real vLLM (the pinned CPU runtime) on this machine: the planner's KV figures against /metrics.
integration: venv fetch
	$(BIN)/python -m pytest tests/integration -m integration

molecule: venv
	$(BIN)/molecule test -s driver
	$(BIN)/molecule test -s lab

fleet: venv fetch
	$(BIN)/python -m pytest tests/fleet -m fleet

clean:
	rm -rf $(VENV) .lab .pytest_cache .mypy_cache .ruff_cache
