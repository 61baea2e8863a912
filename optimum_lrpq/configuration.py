"""`LRPQConfig`: what the user asks for, and what the quantizer decided (bits and relevance per layer).

The config is what transformers writes into `config.json` under `quantization_config`, so every attribute
must stay JSON-serializable (`to_dict()` is a deep copy of `__dict__`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .options import (
    ALLOCATIONS,
    ATTENTION_GRANULARITIES,
    CLIPPING_RULES,
    GRANULARITIES,
    RANGE_METHODS,
    RECONSTRUCTIONS,
    RELEVANCE_RULES,
    RELEVANCE_SCORES,
    RELEVANCE_TARGETS,
    SENSITIVITY_METRICS,
    SOFTMAX_QUANTIZERS,
    WEIGHT_ROUNDINGS,
    check_bits,
    check_choice,
    check_step_groups,
)
from .version import __version__

QUANT_METHOD = "lrpq"

# Bump when the on-disk layout changes in a way older readers cannot load.
# 2: per-channel input quantizers of o_proj / fc2 (`linear_input_granularity`) and per-head q/k/v quantizers
#    (`attention_granularity`); format 1 has both per tensor.
# 3: `input_step_levels`: the per-channel input steps of o_proj / fc2 are partly folded into the stored weight
#    columns; format 2 stores the weights of those layers unfolded (still read, as `input_step_levels=0`).
# 4: `head_input_granularity`: the classifier heads' input quantizers are per channel (one step per input channel,
#    folded like o_proj / fc2); format 3 stores them per tensor (still read, as `head_input_granularity="per_tensor"`).
# 5: `softmax_quantizer="auto"` is log2 for attention probabilities of <= 3 bits; formats <= 4 used log√2 there (still
#    read so: the stored scale is the same tensor, the levels differ).
FORMAT_VERSION = 5

# `input_step_levels` of new quantizations (see LRPQConfig).
DEFAULT_INPUT_STEP_LEVELS = 4
# ... and of new quantizations with 8-bit weights: their columns absorb the whole step ratio with bits to spare, so
# o_proj / fc2 run as one integer GEMM instead of one per level (8-bit weights cannot take the power-of-two levels
# into their codes as 4-bit ones do). DINOv2-S / real-weight DeiT W8A8, 3 draws: 96.0 -> 95.8 / 95.1 -> 95.2 %,
# DINOv2-S W8A8 forward -25 % at batch 1 and -27 % at batch 32 (benchmarks/README.md).
EIGHT_BIT_WEIGHT_INPUT_STEP_LEVELS = 1


def lrpq_config_of(model_or_config: Any) -> LRPQConfig | None:
    """The lrpq quantization config of a quantized model (or of its `PretrainedConfig`); None if it has none.

    The one "is this model lrpq-quantized" predicate: a model is lrpq-quantized when its config carries an lrpq
    `quantization_config` with the bits of every layer (`layer_bits`). A config still in dict form (read from
    `config.json` without the plugin's classes) is converted.
    """
    config = getattr(model_or_config, "config", model_or_config)
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        if quantization.get("quant_method") != QUANT_METHOD or not quantization.get("layer_bits"):
            return None
        return LRPQConfig.from_dict(quantization)
    if not isinstance(quantization, LRPQConfig) or not quantization.layer_bits:
        return None
    return quantization


def require_lrpq_config(model: Any) -> LRPQConfig:
    """`lrpq_config_of(model)`, or a ValueError saying the model is not lrpq-quantized and what to do."""
    config = lrpq_config_of(model)
    if config is None:
        raise ValueError("This model is not quantized with lrpq; run LRPQuantizer.quantize_model first.")
    return config


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")
    return int(value)


class LRPQConfig(QuantizationConfigMixin):
    """Configuration of LRP-QViT post-training quantization.

    Args:
        weight_bits: bits of every quantized weight, or the parameter-weighted average budget when
            `mixed_precision=True`. Integer in 2..8.
        activation_bits: bits of every quantized activation (linear inputs, q, k, v, attention probabilities),
            or the MAC-weighted average budget when `mixed_precision=True`. Integer in 2..8.
        mixed_precision: choose bits per layer from LRP relevance under the budgets above.
        candidate_bits: bit widths the allocation may choose from (mixed precision only).
        uniform_fallback: mixed precision only: quantize the calibration images both ways (the allocation and
            uniform bits at the budgets; calibration only, no reconstruction) and keep uniform bits, with a warning,
            when their logits are clearly closer to the float model's (mean KL below 2/3 of the allocation's, or
            simply below it when both budgets are 6 bits or more; `pipeline.mixed_precision.uniform_fallback_ratio`).
            The allocation's error model can spend a budget
            badly near 6 bits: on the real-weight DeiT benchmark model mixed W6A6 measured 92.7 % against 93.7 %
            uniform (mean of 3 draws; the allocation's calibration KL was about twice uniform's in each draw), and
            93.7 % with the fallback. Costs two extra calibrations. False keeps the allocation whatever it measures.
        patch_embedding_input_bits: bits of the image fed to the patch embedding (RepQ-ViT keeps 8).
        softmax_quantizer: quantizer for post-softmax probabilities: "auto" (default: "log2" at 2-3 bits, where
            log√2's 8 levels stop at 0.088 of the largest probability and zero nearly all others; "log_sqrt2" at 4-6
            bits; "uniform" at 7-8 bits, where a log quantizer's fixed √2 step near 1 costs more than 1/255 uniform
            steps), "log_sqrt2" (RepQ-ViT), "log2" or "uniform".
        weight_range, activation_range: range estimator: "minmax", "percentile_mse" (RepQ-ViT's 3-point percentile
            search by MSE) or "mse" (the min-max range shrunk towards 0 by the factor in 1.0, 0.975, ..., 0.5 with
            the least MSE, per row for weights; never worse than min-max in MSE).
        mlp_hidden_range: range estimator of the MLP hidden activations (the post-GELU inputs of fc2), overriding
            `activation_range` there: "percentile_mse" (default; each channel's range clipped at the searched
            percentile; with too few tokens for per-channel ranges the shared range follows `activation_range`) or
            any `activation_range` choice. A few rare large post-GELU values otherwise set the steps of the whole
            channel. Measured against "minmax" (benchmarks/README.md): real DINOv2-S W6A6 94.8 -> 95.0 %, W4A8
            94.0 -> 94.2 %, mixed W4A4 80.2 -> 81.9 %; Swin W4A4 83.2 -> 83.5 %; every other setting within 0.1.
        weight_rounding: "gptq" (default; GPTQ, Frantar et al. 2022: round one input column at a time and
            compensate the error on the columns not yet rounded, using the input second moments E[x xᵀ] recorded
            during the calibration pass; same grids, same checkpoint format) or "nearest" (round each weight to the
            nearest level, as RepQ-ViT). GPTQ costs in_features² floats of memory per layer during calibration and
            a few seconds more; on real pretrained DINOv2-S it turns W4A8 from 52 % into 93 % (benchmarks/README.md).
        reconstruction: None (default) or "block": after calibration, learn each transformer block's weight
            rounding (AdaRound) and activation steps (LSQ) so that the quantized block reproduces the float block's
            output on the calibration images (BRECQ / QDrop block reconstruction; `pipeline.reconstruction`). The
            block weights are then rounded as learned (`weight_rounding` still rounds the layers outside the blocks).
            Costs `reconstruction_steps` forward + backward passes of each block on `reconstruction_batch_size`
            images; same checkpoint format. Real DINOv2-S W4A4, one calibration draw, 2-core CPU: 68.6 % without,
            82.3 % with 500 steps per block (quantize 9 min instead of 27 s; benchmarks/README.md).
        reconstruction_steps: optimisation steps per block (default 500; 100 gave 74.2 % and 1000 83.8 % in the
            measurement above).
        reconstruction_batch_size: images per reconstruction step.
        reconstruction_drop: QDrop's probability that an element of a block's input is the float model's instead of
            the quantized model's (0: always the quantized input).
        reparameterize: fold per-channel post-LayerNorm quantization into the LayerNorm affine and the next
            linear (RepQ-ViT), so inference uses one per-tensor quantizer.
        center_keys: before quantizing, shift each key channel by its midrange over the calibration tokens (folded
            into the k projection's bias). Each query's scores shift by one constant, which softmax ignores, so the
            float model is unchanged, and the per-head key grid no longer has to cover every channel's offset.
            The ranges are measured during calibration's own pass (its min/max observations corrected after it);
            with range estimators that keep samples, per-tensor o_proj inputs, or mixed precision (whose trials need
            the ranges first) by one float pass over the calibration images before (shared with `center_values` and
            `qk_smoothing`).
        center_values: the same for the value channels (folded into the v projection's bias, and back into the
            output projection's bias: probabilities sum to one, so the attention output shifts by the same
            constant). Blocks whose projections have no bias, or are kept in float, are left as they are. Real
            DINOv2-S W4A4 over three calibration draws: 76.0 % without centring, 83.0 % with keys centred, 85.0 %
            with both (benchmarks/README.md). Trial quantizations of mixed precision (sensitivity, the
            `uniform_fallback` check) are centred too, where a trial converts the layers that carry the shift.
        qk_smoothing: None (off) or the migration strength alpha in [0, 1] of query/key smoothing: before
            quantizing, query channel c is multiplied by s_c = (max|k_c| / max|q_c|) ** alpha and key channel c
            divided by it (folded into the q and k projections; every attention score, so the float model, is
            unchanged), so that one 4-bit step per head serves both operands (`quantization.smoothing`). Its ranges
            are measured like `center_keys`'. Trial quantizations of mixed precision are smoothed like the final
            one.
        linear_input_granularity: input quantizers of o_proj and fc2 (the block linears not fed by a LayerNorm;
            the classifier heads have `head_input_granularity`): "per_channel" (default; one step per
            input channel, applied where the producer's output - GELU, the attention product - is requantized, so
            the kernel stays integer; needs >= 1024 calibration tokens, else the channels share one range) or
            "per_tensor" (RepQ-ViT). DINOv2's
            post-GELU activations span ~10 with most values below 1, which one 6-bit step per tensor cannot resolve:
            per channel lifts real DINOv2-S at W6A6 from 92.9 % to 94.5 % (float 95.3; mean of 3 calibration draws)
            and W4A4 from 12 % to 58 % (benchmarks/README.md).
        head_input_granularity: input quantizers of the classifier heads: "per_channel" (default; heads whose
            input has fewer than 8 bits get one step per input channel, through `input_step_levels` like o_proj /
            fc2; needs >= 32 calibration images, a head seeing one vector per image, else the channels share one
            range) or "per_tensor" (RepQ-ViT; the only choice of format <= 3). The head input after the final
            LayerNorm has a few wide channels that one 4-bit step cannot share with the rest, while at 8 bits one
            step is fine and per-channel ranges from 32 vectors clip more unseen values (benchmarks/README.md, "Head
            inputs per channel").
        attention_granularity: grids of the attention operands q, k, v: "per_head" (default; one grid per head,
            which still factors out of each head's matmuls) or "per_tensor" (RepQ-ViT). On real DINOv2-S at W4A4, the
            4-bit per-tensor q and k are the bottleneck (8-bit q, k alone: 57 % -> 82 %); per head gives 72 %.
        activation_step_groups: step groups of the per-channel o_proj / fc2 input grids: None (default; one step per
            channel) or an integer G >= 1: each channel's step is rounded up to the nearest of the G levels
            s_max / 2**g (g < G; s_max the layer's largest channel step; channels finer than the last level take it)
            and its zero point recomputed for the new step from the low end of its range (observed minimum, or the
            searched grid's lowest level). An integer GEMM factors one activation step out of a dot product, so such
            an input runs as at most G integer GEMMs (zero points stay per channel). Steps only get coarser, so no
            extra clipping; G=1 is one step per tensor with per-channel zero points. The LayerNorm-output grids and
            the per-head q/k/v grids are not affected, nor per-tensor inputs. Rounding up to powers of 2 costs ~0.5
            bit on an average channel whatever G (DINOv2-S fc2 steps span 2^6-2^8.6, so G=8 is about the limit).
            Real DINOv2-S, per channel -> G=2 / 4 / 8 (mean of 2 calibration draws): W8A8 95.8 -> 95.5 / 95.6 / 95.7,
            W6A6 95.1 -> 94.3 / 94.3 / 94.8, W4A8 93.7 -> 93.3 / 93.6 / 93.6, W4A4 72.3 -> 44.8 / 69.6 / 67.9, mixed
            W4A4 82.5 -> 41.5 / 78.7 / 78.3 %.
        input_step_levels: how the per-channel input steps of o_proj / fc2 (`linear_input_granularity=
            "per_channel"`) reach an integer GEMM, which factors one activation step out of a dot product. G >= 1:
            each step is split as s_c = L_c * r_c, L_c the smallest of the G levels s_max / 2**g (g < G) that is
            >= s_c and r_c in (1/2, 1] (smaller below the last level); r_c is multiplied into weight column c before
            the weights are quantized (GPTQ then rounds W·diag(r) with the moments of x / r), so
            y = Σ_c (W_oc r_c) L_c (q_c − z_c): one integer GEMM per level. The activation grid is unchanged (same
            codes); the weights lose at most one bit on the columns they absorb. G=1 folds the whole step ratio into
            the weights (SmoothQuant's migration taken to the end). 0 keeps the steps in the activation grid, as
            format 2 did: those layers then run on the reference float math. None: the default for the format
            (4, or 1 with 8-bit weights, which absorb the whole ratio with bits to spare and then run o_proj / fc2
            as one GEMM; 0 for checkpoints of format 2). Real DINOv2-S per level count: benchmarks/README.md.
        fold_strength: how much of the per-channel ratios r_c the reparameterization folds into the next linear's
            weight columns (r_c^α; 1.0 is RepQ-ViT, 0.0 only re-centres the channels). A number in [0, 1], or a
            list of candidates in [0, 1]: then each LayerNorm gets the candidate with the least output error of its
            consumers (quantized input times quantized weight vs float) on the calibration activations. Ignored
            when `reparameterize=False`.
        clipping: clipped channel-wise quantization of post-LayerNorm activations: None, "ccq_a" (clamp the
            activations to their tensor-level `clipping_percentile` range before the per-channel search) or
            "ccq_b" (clamp per-channel steps to [median / `clipping_ratio`, median * `clipping_ratio`]).
        num_calibration_samples: images used for calibration.
        num_relevance_samples: the first this many calibration images are used for LRP relevance (None: all).
            Relevance costs ~4.5 float forwards per image; on the benchmark models the scores from 16 images rank
            the layers like those from 32 (Spearman 0.95-0.997), so 16 keeps the pass under 3x a calibration forward.
        calibration_batch_size: micro-batch size of the calibration passes.
        seed: seed for any sampling done during calibration.
        relevance_target: start relevance at the "predicted" class or at the "label".
        relevance_score: per-layer contribution score: "operands" (default; Σ|R| over every tensor quantized at the
            layer's bits: its input, and for q/k/v also q, k, v and the attention probabilities, which take the
            q/k/v bits), "linear_abs" (Σ|R| at the layer input), "branch" or "weight".
        relevance_rule: LRP rule set, "chefer" (Chefer et al. 2021) or "epsilon".
        allocation: how mixed precision picks bits: "lrp" (relevance, the method: a unit's relevance is the share of
            the prediction its quantized tensors carry, so the expected error is relevance x 4^-bits and bits follow
            relevance per unit of budget, see `optimum_lrpq.allocation`); "lrp_sensitivity" (Mix-QViT:
            relevance times the measured per-unit sensitivity, see `optimum_lrpq.pipeline.sensitivity`); or the baselines
            "sensitivity" (measured sensitivity alone), "uniform", "random" (a random feasible allocation) and
            "magnitude" (weight-range sensitivity).
        num_sensitivity_samples: images (the first calibration images) on which "lrp_sensitivity" and "sensitivity"
            measure each unit's loss increase when it alone is quantized at each candidate width. The pass costs
            about 2 x units x candidates forwards of these images.
        sensitivity_metric: that loss increase: "kl" (KL divergence of the quantized from the float class
            distribution, nats per image) or "mse" (mean squared logit error).
        sensitivity_weight: weight of the measured sensitivity against the relevance-weighted 4^-b noise model in
            the allocation objective (`allocation.allocate_bits`); the default 1.0 lets the measurement dominate.
        modules_to_not_convert: module names (or name suffixes) that stay in floating point.
        calibration_dataset, calibration_split, calibration_image_column: a dataset given by hub name or local
            path, used when quantizing at load time (`from_pretrained(..., quantization_config=...)`).
        kernel_backend: how a quantized model computes: "auto" (default: an integer backend where this device has
            integer GEMM units: "onednn" on x86 CPUs with AVX512-VNNI or AMX, "intmm" (`torch._int_mm`) on CUDA GPUs,
            else "reference"), "reference"
            (dequantize to float and multiply in float: the oracle) or another registered backend (see
            `optimum_lrpq.kernels.available_backends()`). Calibration always runs on the reference backend. Saved
            with the model; override after loading with `optimum_lrpq.set_kernel_backend(model, name)` or before it
            with the environment variable `OPTIMUM_LRPQ_KERNEL_BACKEND`.
        layer_bits, relevance: filled in by the quantizer; saved with the model.
        base_model: the float model's Hub id or path, recorded by the quantizer for the model card.
    """

    def __init__(
        self,
        weight_bits: int = 4,
        activation_bits: int = 4,
        mixed_precision: bool = False,
        candidate_bits: list[int] | None = None,
        uniform_fallback: bool = True,
        patch_embedding_input_bits: int = 8,
        softmax_quantizer: str = "auto",
        weight_range: str = "minmax",
        activation_range: str = "minmax",
        mlp_hidden_range: str = "percentile_mse",
        weight_rounding: str = "gptq",
        reconstruction: str | None = None,
        reconstruction_steps: int = 500,
        reconstruction_batch_size: int = 8,
        reconstruction_drop: float = 0.5,
        reparameterize: bool = True,
        center_keys: bool = True,
        center_values: bool = True,
        qk_smoothing: float | None = None,
        linear_input_granularity: str | None = None,
        head_input_granularity: str | None = None,
        attention_granularity: str | None = None,
        activation_step_groups: int | None = None,
        input_step_levels: int | None = None,
        fold_strength: float | list[float] = 1.0,
        clipping: str | None = None,
        clipping_percentile: float = 0.999,
        clipping_ratio: float = 4.0,
        num_calibration_samples: int = 32,
        num_relevance_samples: int | None = 16,
        calibration_batch_size: int = 8,
        seed: int = 0,
        relevance_target: str = "predicted",
        relevance_score: str = "operands",
        relevance_rule: str = "chefer",
        allocation: str = "lrp",
        num_sensitivity_samples: int = 8,
        sensitivity_metric: str = "kl",
        sensitivity_weight: float = 1.0,
        modules_to_not_convert: list[str] | None = None,
        calibration_dataset: str | None = None,
        calibration_split: str = "train",
        calibration_image_column: str | None = None,
        kernel_backend: str = "auto",
        layer_bits: dict[str, dict[str, int]] | None = None,
        relevance: dict[str, float] | None = None,
        base_model: str | None = None,
        format_version: int = FORMAT_VERSION,
        lrpq_version: str | None = None,
        **kwargs: Any,
    ):
        kwargs.pop("quant_method", None)  # from_dict passes it back in
        if kwargs:
            raise ValueError(
                f"LRPQConfig got unknown field(s) {sorted(kwargs)}. If they come from a checkpoint, it was written by "
                "a different version of optimum-lrpq: upgrade with `pip install -U optimum-lrpq`."
            )
        self.quant_method = QUANT_METHOD
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.mixed_precision = mixed_precision
        self.candidate_bits = list(candidate_bits) if candidate_bits is not None else None
        self.uniform_fallback = uniform_fallback
        self.patch_embedding_input_bits = patch_embedding_input_bits
        self.softmax_quantizer = softmax_quantizer
        self.weight_range = weight_range
        self.activation_range = activation_range
        self.mlp_hidden_range = mlp_hidden_range
        self.weight_rounding = weight_rounding
        self.reconstruction = reconstruction
        self.reconstruction_steps = reconstruction_steps
        self.reconstruction_batch_size = reconstruction_batch_size
        self.reconstruction_drop = reconstruction_drop
        self.reparameterize = reparameterize
        self.center_keys = center_keys
        self.center_values = center_values
        self.qk_smoothing = qk_smoothing
        self.linear_input_granularity = linear_input_granularity
        self.head_input_granularity = head_input_granularity
        self.attention_granularity = attention_granularity
        self.activation_step_groups = activation_step_groups
        self.input_step_levels = input_step_levels
        self.fold_strength = list(fold_strength) if isinstance(fold_strength, (list, tuple)) else fold_strength
        self.clipping = clipping
        self.clipping_percentile = clipping_percentile
        self.clipping_ratio = clipping_ratio
        self.num_calibration_samples = num_calibration_samples
        self.num_relevance_samples = num_relevance_samples
        self.calibration_batch_size = calibration_batch_size
        self.seed = seed
        self.relevance_target = relevance_target
        self.relevance_score = relevance_score
        self.relevance_rule = relevance_rule
        self.allocation = allocation
        self.num_sensitivity_samples = num_sensitivity_samples
        self.sensitivity_metric = sensitivity_metric
        self.sensitivity_weight = sensitivity_weight
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.calibration_dataset = calibration_dataset
        self.calibration_split = calibration_split
        self.calibration_image_column = calibration_image_column
        self.kernel_backend = kernel_backend
        self.layer_bits = layer_bits
        self.relevance = relevance
        self.base_model = base_model
        self.format_version = format_version
        self.lrpq_version = lrpq_version or __version__
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ValueError naming the field and the fix."""
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, numbers.Integral):
            raise ValueError(f"format_version must be an integer, got {self.format_version!r}.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses lrpq format version {self.format_version} (written by optimum-lrpq "
                f"{self.lrpq_version}), but this optimum-lrpq ({__version__}) reads format version {FORMAT_VERSION} "
                "at most. Upgrade with `pip install -U optimum-lrpq`."
            )
        self.weight_bits = check_bits(self.weight_bits, "weight_bits")
        self.activation_bits = check_bits(self.activation_bits, "activation_bits")
        self.patch_embedding_input_bits = check_bits(self.patch_embedding_input_bits, "patch_embedding_input_bits")
        if self.candidate_bits is not None:
            if not self.candidate_bits:
                raise ValueError("candidate_bits must not be empty; leave it as None for the default set.")
            self.candidate_bits = sorted({check_bits(b, "each of candidate_bits") for b in self.candidate_bits})
        if not isinstance(self.kernel_backend, str) or not self.kernel_backend:
            raise ValueError(f"kernel_backend must be 'auto' or a backend name such as 'reference', got "
                             f"{self.kernel_backend!r}.")
        for flag in ("mixed_precision", "uniform_fallback", "reparameterize", "center_keys", "center_values"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        self.fold_strength = _check_fold_strength(self.fold_strength)
        smoothing = self.qk_smoothing
        if smoothing is not None and (isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real)
                                      or not 0.0 <= float(smoothing) <= 1.0):
            raise ValueError(f"qk_smoothing must be None (off) or a migration strength in [0, 1] such as 0.5, got "
                             f"{smoothing!r}.")
        if self.linear_input_granularity is None:  # checkpoints of format 1 predate the option: per tensor
            self.linear_input_granularity = "per_tensor" if self.format_version < 2 else "per_channel"
        check_choice(self.linear_input_granularity, "linear_input_granularity", GRANULARITIES)
        if self.head_input_granularity is None:  # formats <= 3 predate the option: per tensor
            self.head_input_granularity = "per_tensor" if self.format_version < 4 else "per_channel"
        check_choice(self.head_input_granularity, "head_input_granularity", GRANULARITIES)
        if self.attention_granularity is None:  # format 1 predates the option: per tensor
            self.attention_granularity = "per_tensor" if self.format_version < 2 else "per_head"
        check_choice(self.attention_granularity, "attention_granularity", ATTENTION_GRANULARITIES)
        if self.input_step_levels is None:  # formats 1 and 2 store the o_proj / fc2 weights unfolded
            if self.format_version < 3:
                self.input_step_levels = 0
            else:  # saved resolved, so checkpoints keep the levels they were made with
                self.input_step_levels = (EIGHT_BIT_WEIGHT_INPUT_STEP_LEVELS if self.weight_bits >= 8
                                          else DEFAULT_INPUT_STEP_LEVELS)
        levels = self.input_step_levels
        if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 0:
            raise ValueError(f"input_step_levels must be 0 (steps stay in the activation grid) or a positive number "
                             f"of power-of-two levels, got {levels!r}.")
        self.input_step_levels = int(levels)
        self.activation_step_groups = check_step_groups(self.activation_step_groups, "activation_step_groups")
        check_choice(self.softmax_quantizer, "softmax_quantizer", SOFTMAX_QUANTIZERS)
        check_choice(self.weight_range, "weight_range", RANGE_METHODS)
        check_choice(self.activation_range, "activation_range", RANGE_METHODS)
        check_choice(self.mlp_hidden_range, "mlp_hidden_range", RANGE_METHODS)
        check_choice(self.weight_rounding, "weight_rounding", WEIGHT_ROUNDINGS)
        if self.reconstruction is not None:
            check_choice(self.reconstruction, "reconstruction", RECONSTRUCTIONS)
        self.reconstruction_steps = _check_positive_int(self.reconstruction_steps, "reconstruction_steps")
        self.reconstruction_batch_size = _check_positive_int(self.reconstruction_batch_size,
                                                             "reconstruction_batch_size")
        drop = self.reconstruction_drop
        if isinstance(drop, bool) or not isinstance(drop, numbers.Real) or not 0.0 <= drop <= 1.0:
            raise ValueError(f"reconstruction_drop must be a number in [0, 1], got {drop!r}.")
        self.reconstruction_drop = float(drop)
        check_choice(self.relevance_target, "relevance_target", RELEVANCE_TARGETS)
        check_choice(self.relevance_score, "relevance_score", RELEVANCE_SCORES)
        check_choice(self.relevance_rule, "relevance_rule", RELEVANCE_RULES)
        check_choice(self.allocation, "allocation", ALLOCATIONS)
        self.num_sensitivity_samples = _check_positive_int(self.num_sensitivity_samples, "num_sensitivity_samples")
        check_choice(self.sensitivity_metric, "sensitivity_metric", SENSITIVITY_METRICS)
        if isinstance(self.sensitivity_weight, bool) or not isinstance(self.sensitivity_weight, numbers.Real) or not (
            math.isfinite(self.sensitivity_weight) and self.sensitivity_weight > 0
        ):
            raise ValueError(f"sensitivity_weight must be a positive finite number, got {self.sensitivity_weight!r}.")
        self.sensitivity_weight = float(self.sensitivity_weight)
        if self.clipping is not None:
            check_choice(self.clipping, "clipping", CLIPPING_RULES)
        if isinstance(self.clipping_percentile, bool) or not isinstance(self.clipping_percentile, numbers.Real) or not (
            0.5 < self.clipping_percentile <= 1.0
        ):
            raise ValueError(f"clipping_percentile must be a number in (0.5, 1], got {self.clipping_percentile!r}.")
        if isinstance(self.clipping_ratio, bool) or not isinstance(self.clipping_ratio, numbers.Real) or (
            self.clipping_ratio < 1.0
        ):
            raise ValueError(f"clipping_ratio must be a number >= 1, got {self.clipping_ratio!r}.")
        self.num_calibration_samples = _check_positive_int(self.num_calibration_samples, "num_calibration_samples")
        if self.num_relevance_samples is not None:
            self.num_relevance_samples = _check_positive_int(self.num_relevance_samples, "num_relevance_samples")
        self.calibration_batch_size = _check_positive_int(self.calibration_batch_size, "calibration_batch_size")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if self.layer_bits is not None:
            self.layer_bits = _check_layer_bits(self.layer_bits)
        if self.relevance is not None and (
            not isinstance(self.relevance, dict)
            or not all(isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool)
                       for k, v in self.relevance.items())
        ):
            raise ValueError("relevance must map layer names to numbers.")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ValueError(f"base_model must be a Hub id or path (a string), got {self.base_model!r}.")


def _check_fold_strength(value: Any) -> float | list[float]:
    def strength(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
            raise ValueError(
                f"fold_strength must be a number in [0, 1] or a non-empty list of them, got {value!r}."
            )
        return float(v)

    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("fold_strength must not be an empty list; give one number or several candidates.")
        return [strength(v) for v in value]
    return strength(value)


def _check_layer_bits(layer_bits: Any) -> dict[str, dict[str, int]]:
    if not isinstance(layer_bits, dict):
        raise ValueError(f"layer_bits must be a dict of layer name -> {{'weight': b, 'activation': b}}, got {layer_bits!r}.")
    checked: dict[str, dict[str, int]] = {}
    for name, entry in layer_bits.items():
        if not isinstance(entry, dict) or not set(entry) <= {"weight", "activation"}:
            raise ValueError(f"layer_bits[{name!r}] must be a dict with keys 'weight' and/or 'activation', got {entry!r}.")
        checked[name] = {kind: check_bits(b, f"layer_bits[{name!r}][{kind!r}]") for kind, b in entry.items()}
    return checked
