"""Write deploy/schemas/*.json: the schemas of the custom resources amqpsched's manifests use,
pruned to the fields they use.

Each schema is the CRD's own ``openAPIV3Schema``, kept only along the paths that some rendered
object of some overlay has, with ``additionalProperties: false`` wherever the CRD lists an
object's properties (so a misspelt or unknown field fails, as with ``kubectl apply
--validate=strict``), and Kubernetes' extensions turned into JSON Schema (int-or-string,
nullable). tests/test_deploy.py validates every rendered custom resource against these files,
offline. Using a new field: get the CRD of the operator version you run, then

    python deploy/schemas/prune_crd.py --source "kedacore/keda v2.x" path/to/crd.yaml ...

(renders deploy/overlays/* with kubectl; one schema per kind and version in the CRD files given).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
OUT = DEPLOY / "schemas"
#: Schema keywords kept as they are (descriptions are dropped: the CRD is the reference).
KEEP = ("type", "enum", "format", "pattern", "minimum", "maximum", "minLength", "maxLength",
        "minItems", "maxItems", "required", "default")  # fmt: skip


def schema_file(group: str, version: str, kind: str) -> Path:
    return OUT / f"{group}_{version}_{kind.lower()}.json"


def render_overlays(kubectl: str = "kubectl") -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for overlay in sorted((DEPLOY / "overlays").iterdir()):
        if (overlay / "kustomization.yaml").exists():
            out = subprocess.run(
                [kubectl, "kustomize", str(overlay)], check=True, capture_output=True, text=True
            ).stdout
            objects += [o for o in yaml.safe_load_all(out) if o]
    return objects


def prune(schema: dict[str, Any], instances: list[Any]) -> dict[str, Any]:
    """``schema`` restricted to what ``instances`` (the values found at its path) use."""
    out: dict[str, Any] = {k: schema[k] for k in KEEP if k in schema}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return out
    dicts = [i for i in instances if isinstance(i, dict)]
    if "properties" in schema:
        used = sorted({k for d in dicts for k in d})
        out["properties"] = {
            key: prune(schema["properties"][key], [d[key] for d in dicts if key in d])
            for key in used
            if key in schema["properties"]
        }
        out["additionalProperties"] = False
    elif isinstance(schema.get("additionalProperties"), dict):
        values = [v for d in dicts for v in d.values()]
        out["additionalProperties"] = prune(schema["additionalProperties"], values)
    if isinstance(schema.get("items"), dict):
        items = [x for i in instances if isinstance(i, list) for x in i]
        out["items"] = prune(schema["items"], items)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crds", nargs="+", type=Path, help="CRD YAML files")
    parser.add_argument("--source", required=True, help="where the CRDs come from (recorded)")
    parser.add_argument("--kubectl", default="kubectl")
    args = parser.parse_args(argv)
    objects = render_overlays(args.kubectl)
    for path in args.crds:
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            api_version = f"{group}/{version['name']}"
            found = [o for o in objects if o["apiVersion"] == api_version and o["kind"] == kind]
            if not found:
                continue
            schema = prune(version["schema"]["openAPIV3Schema"], found)
            schema = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$comment": f"{kind} ({api_version}) from {args.source} ({path.name}), pruned "
                "to the fields deploy/ uses by deploy/schemas/prune_crd.py",
                **schema,
            }
            target = schema_file(group, version["name"], kind)
            target.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
            print(f"wrote {target.relative_to(DEPLOY.parent)} ({len(found)} object(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
