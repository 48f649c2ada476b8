"""`sandbox policy compile|explain PROFILE --target kubernetes`: the manifests and the degradations.

The backend configuration comes from ``--config FILE`` or ``$SANDBOX_KUBE_CONFIG`` (see
:mod:`sandbox.kube.config`); ``--namespace`` overrides its namespace.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click
import yaml

from sandbox.kube import degradations as dg
from sandbox.kube.compiler import compile_manifests
from sandbox.kube.config import KubeConfig, load_config
from sandbox.policy import Policy, PolicyError

CONFIG_ENV = "SANDBOX_KUBE_CONFIG"


def config_for(config_path: str | None, namespace: str | None) -> KubeConfig:
    from sandbox.cli import EXIT_USAGE, fail

    path = config_path or os.environ.get(CONFIG_ENV) or None
    try:
        cfg = load_config(path)
        if namespace:
            data = cfg.model_dump()
            data["namespace"] = namespace
            if cfg.egress_proxy.namespace == cfg.namespace:
                data["egress_proxy"]["namespace"] = None  # follows the namespace unless set apart
            from sandbox.kube.config import config_from_dict

            cfg = config_from_dict(data, source=f"--namespace {namespace}")
    except PolicyError as e:
        fail(str(e), EXIT_USAGE, kind="config", problems=[list(p) for p in e.problems])
    return cfg


def _refused(e: dg.KubeRefused) -> None:
    from sandbox.cli import EXIT_USAGE, fail

    fail(str(e), EXIT_USAGE, kind="refused", problems=[list(p) for p in e.problems])


def print_manifests(pol: Policy, cfg: KubeConfig, as_json: bool) -> None:
    try:
        docs = compile_manifests(pol, cfg)
    except dg.KubeRefused as e:
        _refused(e)
    if as_json:
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=2))
    else:
        header = (f"# sandbox policy compile {pol.name} --target kubernetes ({pol.digest()[:19]})\n"
                  f"# accepted degradations: {', '.join(d.id for d in dg.find(pol, cfg)) or 'none'}\n"
                  "# apply with: kubectl apply --server-side --field-validation=Strict -f -\n")
        click.echo(header + yaml.safe_dump_all(docs, sort_keys=False), nl=False)


def explain(pol: Policy, cfg: KubeConfig, as_json: bool) -> None:
    found = dg.find(pol, cfg)
    refusals = dg.refusals(pol, cfg)
    ok = not refusals and all(d.accepted for d in found)
    if as_json:
        doc: dict[str, Any] = {"policy": pol.name, "digest": pol.digest(), "target": "kubernetes",
                               "namespace": cfg.namespace, "compiles": ok,
                               "degradations": [d.to_json() for d in found],
                               "refusals": [{"key": k, "reason": r} for k, r in refusals]}
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"policy {pol.name} on Kubernetes (namespace {cfg.namespace}): "
                    + ("compiles" if ok else "REFUSED until every row is accepted"), show_lines=True)
    for col in ("degradation", "what the cluster cannot enforce", "workaround applied", "accepted"):
        t.add_column(col)
    for d in found:
        t.add_row(escape(d.id), escape(d.lost), escape(d.workaround), escape(d.accepted) if d.accepted else "NO",
                  style=None if d.accepted else "bold red")
    for k, r in refusals:
        t.add_row(escape(k), escape(r), "none: refused", "cannot be accepted", style="bold red")
    Console(soft_wrap=False).print(t)


# ------------------------------------------------------------------ sandbox kube


@click.group("kube")
def kube_group() -> None:
    """Set up a Kubernetes deployment (deploy/kubernetes)."""


@kube_group.command("admin-tls")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="sandbox-egress-admin", show_default=True,
              help="The one name the replicas' certificate carries (egress_proxy.admin_tls_name).")
@click.option("--days", type=int, default=365, show_default=True, help="Validity of the CA and the certificate.")
@click.option("--namespace", default="sandbox-system", show_default=True, help="For the printed kubectl commands.")
@click.option("--force", is_flag=True, help="Replace existing files in DIRECTORY.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def admin_tls_cmd(directory: str, name: str, days: int, namespace: str, force: bool, as_json: bool) -> None:
    """Make the TLS material of the egress proxy's admin channel: DIRECTORY/ca.crt (public, for the
    worker), DIRECTORY/tls.crt and DIRECTORY/tls.key (mode 0600, for the proxy pods only), and print
    the kubectl commands that make the Secret and the ConfigMap deploy/kubernetes mounts. The CA's
    private key is not kept: rerun (with --force) to renew, before the printed expiry."""
    from sandbox.cli import EXIT_USAGE, emit_json, fail
    from sandbox.kube import admin_tls

    try:
        files = admin_tls.generate(directory, name=name, days=days, force=force)
    except admin_tls.AdminTlsError as e:
        fail(str(e), EXIT_USAGE, kind="usage")
    commands = admin_tls.kubectl_commands(files, namespace)
    if as_json:
        emit_json({"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key), "name": files.name,
                   "not_after": files.not_after.isoformat(timespec="seconds"), "commands": commands})
        return
    click.echo(f"# the egress proxy's admin TLS material for the name {files.name}, valid until "
               f"{files.not_after:%Y-%m-%d %H:%M} UTC (rerun with --force before then)\n"
               f"#   {files.ca}  the CA (public): the worker's egress_proxy.admin_tls_ca_file, via a ConfigMap\n"
               f"#   {files.cert}, {files.key} (mode 0600): the proxy's --admin-tls-cert/--admin-tls-key, "
               "via a Secret mounted into the proxy pods only\n"
               "# the CA's private key was not kept. Create them in the cluster, then delete the key file here:")
    for c in commands:
        click.echo(c)
    if files.name != "sandbox-egress-admin":
        click.echo(f"# and set egress_proxy.admin_tls_name: {files.name} in the backend configuration")
