"""schemathesis against /api/v1/openapi.json of a running daemon: no 5xx, and responses
conform to the document (status codes, content types, schemas, Allow headers, auth).

Bounded: a fixed seed and a small number of examples per operation (a few seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from netbootd.http.testkit import TOKEN, ServerThread, make_app, populate

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,unsupported_method,allow_header_conformance,"
          "missing_required_header,ignored_auth")


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "anonymous"])
def test_openapi_fuzzing_finds_no_server_errors(tmp_path: Path, with_token: bool):
    if not SCHEMATHESIS.exists():
        pytest.fail("schemathesis not installed: .venv/bin/pip install -e '.[test]'",
                    pytrace=False)
    app = make_app(tmp_path / "d", real_store=True)
    populate(app)
    auth = ["-H", f"Authorization: Bearer {TOKEN}"] if with_token else []
    with ServerThread(app) as srv:
        res = subprocess.run(
            [str(SCHEMATHESIS), "run", f"{srv.url}/api/v1/openapi.json", *auth,
             "--checks", CHECKS, "--max-examples", "15", "--seed", "20261123",
             "--request-timeout", "10", "--max-failures", "5", "--no-color"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]
    assert "passed" in res.stdout
