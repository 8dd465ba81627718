# The two commands of the README: `make demo` and `make test`.
# Every target creates the virtualenv it needs (scripts/mkvenv) on first use.

SHELL := /bin/bash
VENVS := .venvs

# The quick default environment: Python 3.11, Django 5.2 LTS, psycopg 3.
PY ?= 3.11
DJANGO ?= django>=5.2,<5.3
DRIVER ?= psycopg3
VENV ?= $(VENVS)/py$(subst .,,$(PY))-$(if $(findstring 6.,$(DJANGO)),dj6,dj52)-$(DRIVER)
SETTINGS ?= tests.settings.$(DRIVER)
# What to run and how: `make test PYTEST_ARGS="tests/test_cap.py -x"`. With no path in
# it, pytest runs its testpaths (tests/).
PYTEST_ARGS ?=

PYTEST = $(VENV)/bin/python -m gevent.monkey --module pytest

.PHONY: test test-matrix matrix-lane-psycopg3 matrix-lane-psycopg2 test-postgis test-oldest lint system-deps venv demo bench bench-work clean

venv:
	@scripts/mkvenv $(VENV) $(PY) '$(DJANGO)' $(DRIVER),test

## system packages the suite starts (redis-server, haproxy, pgbouncer): installed when
## root on Debian, otherwise the exact command is printed and make stops
system-deps:
	@scripts/install-system-deps

## make test: one environment, the whole suite (quick)
test: system-deps venv
	DJANGO_SETTINGS_MODULE=$(SETTINGS) $(PYTEST) -q $(PYTEST_ARGS)

## make test-postgis: the Django-parity tests with the PostGIS ENGINE
test-postgis: venv
	@scripts/install-system-deps --postgis
	DJANGO_SETTINGS_MODULE=tests.settings.postgis $(PYTEST) -q $(or $(PYTEST_ARGS),tests/test_django_parity.py)

## make test-oldest: the suite on the oldest versions the README claims (DRIVER=psycopg2 too)
OLDEST_COMMON := django==5.2 gevent==23.9.0 gunicorn==22.0.0
OLDEST_psycopg3 := $(OLDEST_COMMON) psycopg[binary]==3.2.1
OLDEST_psycopg2 := $(OLDEST_COMMON) psycopg2-binary==2.9.9 psycogreen==1.0.2
OLDEST_VENV = $(VENVS)/py311-oldest-$(DRIVER)
test-oldest: system-deps
	@scripts/mkvenv $(OLDEST_VENV) 3.11 '$(OLDEST_$(DRIVER))' $(DRIVER),test
	DJANGO_SETTINGS_MODULE=$(SETTINGS) $(OLDEST_VENV)/bin/python -m gevent.monkey --module pytest -q $(PYTEST_ARGS)

## make lint: ruff (lint + format check) and mypy, in their own virtualenv
lint:
	@scripts/mkvenv $(VENVS)/lint 3.11 'django>=5.2,<5.3' psycopg3,psycopg2,lint
	$(VENVS)/lint/bin/ruff check .
	$(VENVS)/lint/bin/ruff format --check .
	$(VENVS)/lint/bin/mypy

## make test-matrix: what CI runs (lint; both drivers, Django 5.2 on 3.11 and 6.x on 3.13;
## PostGIS; the oldest claimed versions), the two drivers' rows in two lanes at once
test-matrix:
	$(MAKE) lint
	@scripts/install-system-deps --postgis
	@scripts/run-lanes matrix-lane-psycopg3 matrix-lane-psycopg2

# One lane per driver; scripts/run-lanes runs the two at once (about half the time).
matrix-lane-psycopg3:
	$(MAKE) test PY=3.11 DJANGO='django>=5.2,<5.3' DRIVER=psycopg3
	$(MAKE) test PY=3.13 DJANGO='django>=6.0,<7' DRIVER=psycopg3
	$(MAKE) test-postgis PY=3.11 DJANGO='django>=5.2,<5.3' DRIVER=psycopg3
	$(MAKE) test-oldest DRIVER=psycopg3

matrix-lane-psycopg2:
	$(MAKE) test PY=3.11 DJANGO='django>=5.2,<5.3' DRIVER=psycopg2
	$(MAKE) test PY=3.13 DJANGO='django>=6.0,<7' DRIVER=psycopg2
	$(MAKE) test-postgis PY=3.13 DJANGO='django>=6.0,<7' DRIVER=psycopg2
	$(MAKE) test-oldest DRIVER=psycopg2

## make demo: gunicorn + gevent workers on the pool, against a throwaway PostgreSQL
demo: venv
	$(VENV)/bin/python example/demo.py

## make bench: our pool against every reference, in one run (writes docs/benchmarks.md and .png)
## (BENCH_ARGS="--rounds 5", "--only ours[psycopg3],old_geventpool", "--quick")
bench:
	@bench/prepare
	$(VENVS)/bench-psycopg3/bin/python -m bench $(BENCH_ARGS)

## make bench-work: instructions and cache misses per checkout at 10/1,000/5,000 waiters,
## counted under valgrind's cachegrind (writes docs/benchmarks-work.md; apt-get install valgrind)
bench-work:
	@bench/prepare
	$(VENVS)/bench-psycopg3/bin/python -m bench.countwork $(BENCH_WORK_ARGS)

clean:
	rm -rf $(VENVS)
