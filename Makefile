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
PYTEST_ARGS ?=

PYTEST = $(VENV)/bin/python -m gevent.monkey --module pytest

.PHONY: test test-matrix test-postgis venv demo bench bench-work clean

venv:
	@scripts/mkvenv $(VENV) $(PY) '$(DJANGO)' $(DRIVER),test

## make test: one environment, the whole suite (quick)
test: venv
	DJANGO_SETTINGS_MODULE=$(SETTINGS) $(PYTEST) -q $(PYTEST_ARGS) tests

## make test-postgis: the Django-parity tests with the PostGIS ENGINE
test-postgis: venv
	DJANGO_SETTINGS_MODULE=tests.settings.postgis $(PYTEST) -q $(PYTEST_ARGS) tests/test_django_parity.py

## make test-matrix: what CI runs (both drivers, Django 5.2 on 3.11 and 6.x on 3.13, PostGIS)
test-matrix:
	$(MAKE) test PY=3.11 DJANGO='django>=5.2,<5.3' DRIVER=psycopg3
	$(MAKE) test PY=3.11 DJANGO='django>=5.2,<5.3' DRIVER=psycopg2
	$(MAKE) test PY=3.13 DJANGO='django>=6.0,<7' DRIVER=psycopg3
	$(MAKE) test PY=3.13 DJANGO='django>=6.0,<7' DRIVER=psycopg2
	$(MAKE) test-postgis PY=3.11 DJANGO='django>=5.2,<5.3' DRIVER=psycopg3
	$(MAKE) test-postgis PY=3.13 DJANGO='django>=6.0,<7' DRIVER=psycopg2

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
