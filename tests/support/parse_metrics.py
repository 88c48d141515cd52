#!/usr/bin/env python3
"""Parses a metrics page from stdin with the reference Python parser (prometheus_client:
Debian's python3-prometheus-client, or PyPI's) and prints its samples as JSON:
[{"family", "type", "name", "labels", "value"}].

  parse_metrics.py text         Prometheus text format 0.0.4
  parse_metrics.py openmetrics  OpenMetrics 1.0 (strict: # EOF, counter suffixes, ...)

Exits non-zero (with the parser's message) when the page does not parse.
"""
import json
import math
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as text

page = sys.stdin.read()
parse = om if sys.argv[1] == "openmetrics" else text
out = []
names = []
for fam in parse(page):
    names.append(fam.name)
    for s in fam.samples:
        v = s.value
        out.append({"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels,
                    "value": None if math.isnan(v) else v})
if len(names) != len(set(names)):
    sys.exit(f"a family appears twice: {sorted(n for n in names if names.count(n) > 1)}")
json.dump(out, sys.stdout)
