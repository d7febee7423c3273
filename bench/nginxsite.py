"""nginx as the reference server of the HTTP benchmarks: one worker, sendfile, no access
log, everything (pid, logs, temp files) inside the benchmark's own temporary directory,
on a loopback port. The benchmarks differ only in their ``location`` blocks."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

_CONF = """
worker_processes 1;
daemon off;
{user}
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  {http_extra}
  default_type application/octet-stream;
  client_body_temp_path {dir}/nginx-tmp;
  proxy_temp_path {dir}/nginx-tmp;
  fastcgi_temp_path {dir}/nginx-tmp;
  uwsgi_temp_path {dir}/nginx-tmp;
  scgi_temp_path {dir}/nginx-tmp;
  server {{
    listen 127.0.0.1:{port};
    {locations}
  }}
}}
"""


def start_nginx(workdir: Path, port: int, locations: str, *, connections: int = 256,
                http_extra: str = "", prefix: Sequence[str] = ()) -> subprocess.Popen:
    """nginx serving ``locations`` on 127.0.0.1:``port`` (the caller waits for the port
    and stops the process with :func:`stop_nginx`). ``prefix`` runs it under e.g. taskset."""
    (workdir / "nginx-tmp").mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(_CONF.format(dir=workdir, port=port, locations=locations,
                                 connections=connections, http_extra=http_extra,
                                 user="user root;" if os.geteuid() == 0 else ""))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen([*prefix, nginx, "-p", str(workdir), "-c", str(conf)],
                            stderr=subprocess.DEVNULL)


def stop_nginx(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
