"""`schema --check registry:SUBJECT[/VERSION]`: a producer's schema read from a Schema Registry (tests/
schema_registry.py, a real HTTP server) in each of its formats gives the errors and warnings a JSON Schema file
gives; an unknown subject or an unreachable registry is one line, exit non-zero, no traceback."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

from tests.schema_registry import TestRegistry


def run(model: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "workers", "schema", "--model", model, *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def proto_text_to_serialized(text: str, tmp_path) -> str:
    """A .proto compiled by protoc (grpcio-tools): the base64 FileDescriptorProto a serializer registers."""
    from google.protobuf import descriptor_pb2

    (tmp_path / "input.proto").write_text(text)
    out = tmp_path / "input.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}",
                    "input.proto"], check=True)
    return base64.b64encode(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
                            .SerializeToString()).decode()


def test_registry_subjects_of_each_format_are_checked_like_a_file(models, tmp_path):
    model = models["categorical"]
    reg = TestRegistry()
    ours = json.loads(run(model).stdout)
    avro = json.loads(run(model, "--format", "avro").stdout)
    reg.register("good-json", json.dumps(ours), "JSON")
    reg.register("good-avro", json.dumps(avro), "AVRO")
    reg.register("good-proto", proto_text_to_serialized(run(model, "--format", "protobuf").stdout, tmp_path),
                 "PROTOBUF")
    url = ("--schema-registry-url", reg.url)
    for subject, kind in (("good-json", "JSON"), ("good-avro", "AVRO"), ("good-proto", "PROTOBUF")):
        proc = run(model, "--check", f"registry:{subject}", *url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.splitlines()[-1].startswith(f"{subject} version 1 ({kind}, id ")
        assert "0 error(s), 0 warning(s)" in proc.stdout, proc.stdout

    # Version 2 of the Avro subject: what the JSON file test breaks, in Avro terms.
    fields = {f["name"]: f for f in avro["fields"]}
    fields["x3"]["type"] = ["null", "string"]  # a numeric feature sent as text: rejected records
    fields["color"]["type"] = ["null", {"type": "enum", "name": "Color", "symbols": ["red", "green", "purple"]}]
    fields["id"]["type"] = ["null", "string"]  # may be null: an error (as in a JSON Schema file)
    bad = {**avro, "fields": [f for n, f in fields.items() if n != "x7"]}  # x7 never sent
    reg.register("good-avro", json.dumps(bad), "AVRO")
    want = ["error: feature 'x3' may be ['string']; the model needs a number or null (such records are "
            "dead-lettered)",
            "warning: feature 'color': categories ['purple'] are unknown to the model (missing)",
            "warning: feature 'x7' is not in the producer's schema: missing (null) on every record"]
    for spec in ("registry:good-avro", "registry:good-avro/2", "registry:good-avro/latest"):
        proc = run(model, "--check", spec, *url)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert all(line in lines for line in want), lines
        assert "error: id field 'id' may be ['null']; it must be a string or integer" in lines, lines
        assert any(line.startswith("warning: id field 'id' is not required") for line in lines)
        assert lines[-1].startswith("good-avro version 2 (AVRO, id ")
        assert "2 error(s), 3 warning(s)" in lines[-1]
    assert run(model, "--check", "registry:good-avro/1", *url).returncode == 0  # version 1 as it was

    # The same mistakes in a Protobuf subject: text for a number, bytes for a category, a feature left out.
    proto = run(model, "--format", "protobuf").stdout
    proto = proto.replace("optional double x3 ", "optional string x3 ").replace("optional string color ",
                                                                              "optional bytes color ")
    proto = "\n".join(line for line in proto.splitlines() if " x7 " not in line)
    reg.register("bad-proto", proto_text_to_serialized(proto, tmp_path), "PROTOBUF")
    proc = run(model, "--check", "registry:bad-proto", *url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert want[0] in lines and want[2] in lines, lines
    assert any(line.startswith("error: feature 'color' may be ['bytes']") for line in lines), lines


def test_unknown_subject_and_unreachable_registry_are_one_line(models):
    model = models["categorical"]
    reg = TestRegistry()
    url = ("--schema-registry-url", reg.url)
    cases = [(("--check", "registry:nobody", *url), 2, "has no subject 'nobody'"),
             (("--check", "registry:nobody/3", *url), 2, "has no version 3 of subject 'nobody'"),
             (("--check", "registry:x/zero", *url), 2, "use registry:SUBJECT or registry:SUBJECT/VERSION"),
             (("--check", "registry:nobody"), 2, "SCORING_SCHEMA_REGISTRY__URL")]
    cases.append((("--check", "registry:nobody", *url), 1, "unreachable"))
    for n, (args, code, text) in enumerate(cases):
        if n == len(cases) - 1:
            reg.stop()
        proc = run(model, *args)
        assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
        err = proc.stderr.strip()
        assert "\n" not in err and text in err and "Traceback" not in err, (args, err)


def test_registry_credentials_come_from_the_registry_settings(models):
    """Basic auth: the username option and the password from SCORING_SCHEMA_REGISTRY__PASSWORD (never printed);
    a refused password is one line naming that setting (exit 2)."""
    model = models["categorical"]
    reg = TestRegistry(users={"reader": "s3cret-pw"})
    reg.register("auth-json", run(model).stdout, "JSON")
    args = ("--check", "registry:auth-json", "--schema-registry-url", reg.url, "--schema-registry-username", "reader")
    proc = run(model, *args, env={"SCORING_SCHEMA_REGISTRY__PASSWORD": "s3cret-pw"})
    assert proc.returncode == 0 and "0 error(s), 0 warning(s)" in proc.stdout, proc.stdout + proc.stderr
    proc = run(model, *args, env={"SCORING_SCHEMA_REGISTRY__PASSWORD": "wrong-pw"})
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "SCORING_SCHEMA_REGISTRY__PASSWORD" in err and "\n" not in err, err
    assert "wrong-pw" not in proc.stdout + err and "Traceback" not in err
