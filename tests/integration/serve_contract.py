"""Schema-driven fuzzing of a live `recforge serve` against its own OpenAPI document
(schemathesis), and a Triton HTTP client session against its KServe v2 routes."""

from __future__ import annotations

import numpy as np

SEED = 20_261_203
MAX_EXAMPLES = 30


def fuzz_openapi(url: str, max_examples: int = MAX_EXAMPLES) -> dict[str, int]:
    """Every operation of ``url``'s OpenAPI document, ``max_examples`` schema-valid and as many
    schema-invalid requests each (fixed seed): fails on any 5xx, a status the operation does not
    document, a response (or content type) that breaks its schema, a schema-valid request that is
    rejected or a schema-invalid one that is accepted. Returns the requests sent per operation."""
    import requests
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import checks
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    schema.config.update(base_url=url)
    always = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
        checks.response_headers_conformance,
    ]
    by_mode = {
        GenerationMode.POSITIVE: [*always, checks.positive_data_acceptance],
        # Inference: whether a tensor's data fits its shape is beyond JSON Schema.
        "infer": always,
        GenerationMode.NEGATIVE: [*always, checks.negative_data_rejection],
    }
    session = requests.Session()
    sent: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            infer = mode is GenerationMode.POSITIVE and operation.path.endswith("/infer")
            mode_checks = by_mode["infer" if infer else mode]
            label = f"{operation.label} [{mode.value}]"
            sent[label] = 0

            run = _property(operation, mode, mode_checks, label, sent, session, max_examples)
            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, label
                del sent[label]  # no request breaks this schema (no body, string parameters)
            except BaseException as exc:  # every operation runs; all failures are reported
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    return sent


def _property(operation, mode, mode_checks, label, sent, session, max_examples):
    from hypothesis import HealthCheck, Phase, given, seed, settings

    @seed(SEED)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        sent[label] += 1
        case.call_and_validate(session=session, checks=mode_checks, timeout=30)

    return run


def triton_session(url: str, rec, model_name: str = "recforge") -> None:
    """``tritonclient.http`` against ``url``: readiness, metadata, config and inference with JSON
    and binary tensors (both ways, with and without a version and compression), each answer
    equal to the in-process :class:`Recommender` (``rec``)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model_name) and client.is_model_ready(model_name, "1")
    assert not client.is_model_ready("other") and not client.is_model_ready(model_name, "2")
    server = client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(model_name)
    assert meta == client.get_model_metadata(model_name, "1")
    assert [t["name"] for t in meta["inputs"]] == rec.input_names
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    config = client.get_model_config(model_name)
    assert [t["name"] for t in config["input"]] == rec.input_names
    assert config["max_batch_size"] == 0 and config["backend"] == "onnxruntime"

    feeds = _feeds(rec)
    expected = rec.run_model(feeds)
    for binary_in in (False, True):
        for binary_out in (False, True):
            for version, compression in (("", None), ("1", "gzip")):
                inputs = []
                for name, array in feeds.items():
                    tensor = httpclient.InferInput(name, list(array.shape), _v2(array))
                    tensor.set_data_from_numpy(array, binary_data=binary_in)
                    inputs.append(tensor)
                outputs = [httpclient.InferRequestedOutput("user_vector", binary_data=binary_out)]
                result = client.infer(
                    model_name,
                    inputs,
                    model_version=version,
                    outputs=outputs,
                    request_id="r1",
                    request_compression_algorithm=compression,
                )
                got = result.as_numpy("user_vector")
                assert got.dtype == np.float32 and got.shape == expected.shape
                assert np.allclose(got, expected, atol=1e-6), (binary_in, binary_out, version)
                response = result.get_response()
                assert response["id"] == "r1" and response["model_version"] == "1"
                output = response["outputs"][0]
                assert ("parameters" in output) == binary_out and ("data" in output) != binary_out
    # No outputs named: the client asks for every output in binary.
    inputs = []
    for name, array in feeds.items():
        tensor = httpclient.InferInput(name, list(array.shape), _v2(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    assert np.allclose(
        client.infer(model_name, inputs).as_numpy("user_vector"), expected, atol=1e-6
    )
    # Errors come back as the client's exception with the server's message.
    bad = httpclient.InferInput("item_ids", [1, 2], "INT64")
    bad.set_data_from_numpy(np.array([[1, 10**9]], dtype=np.int64))
    try:
        client.infer(model_name, [bad])
    except InferenceServerException as exc:
        assert exc.status() == "422" and "item_ids" in exc.message(), exc
    else:
        raise AssertionError("an out-of-range input was accepted")
    client.close()


def _feeds(rec) -> dict[str, np.ndarray]:
    """Two rows of every input the model takes, with in-range values."""
    feeds = {"item_ids": np.array([[1, 2, 0], [3, 0, 0]], dtype=np.int64)}
    for spec in rec.inputs[1:]:
        if spec["name"] == "user_idx":
            feeds["user_idx"] = np.array([1, 0], dtype=np.int64)
        elif spec["dtype"] == "float32":
            feeds[spec["name"]] = np.zeros((2, int(spec["shape"][1])), dtype=np.float32)
        else:
            feeds[spec["name"]] = np.array([[1], [-1]], dtype=np.int64)
    return feeds


def _v2(array: np.ndarray) -> str:
    return "FP32" if array.dtype == np.float32 else "INT64"
