"""Cheaper TensorFlow ops for parts of a training step, with the same mathematics.

Most of a training step of the U-Net is convolutions that oneDNN already runs near the
machine's peak. Four of the remaining costs have cheaper equivalents:

- Keras' Adam updates each variable with 8 element-wise ops; TensorFlow's fused
  ``ResourceApplyAdam`` kernel does the same update in one pass: :class:`FusedAdam`.
- The gradient of 2x nearest-neighbour upsampling (the U-Net decoder's ``UpSampling2D``) is a
  2x2 sum pool, which oneDNN's average pooling (times 4) computes faster than TensorFlow's
  ``ResizeNearestNeighborGrad``: :func:`fast_upsampling_gradients`.
- A frozen input BatchNormalization (``--input-norm frozen``, see
  :func:`pneumo_cli.model.build.set_input_norm`) runs as a fused batch-norm kernel that is slow
  on a 3-channel image; as a multiply-add it is cheap: :func:`unfuse_frozen_norm`.
- The encoder pads the input of each 3x3 convolution in a layer of its own (a copy forward, a
  slice backward); a 'SAME' convolution pads inside oneDNN: :func:`fold_zero_padding`.

``benchmarks/bench_precision.py`` measures them against plain Keras ops on the machine at hand
(the README records the numbers and the CPU). None changes what is saved: weights, model files
and optimizer checkpoints keep the layout of the plain layers.
"""

from __future__ import annotations

import types
from typing import Any

from pneumo_cli.engine.tf import import_tf

tf = import_tf()


class FusedAdam(tf.keras.optimizers.Adam):
    """Keras' Adam whose dense updates run as one ``ResourceApplyAdam`` kernel per variable.

    Same update, same slot variables and checkpoint layout as ``tf.keras.optimizers.Adam``:
    a checkpoint written by either restores into the other. With ``t`` the step (from 1),
    ``m += (g - m)(1 - beta_1)``, ``v += (g^2 - v)(1 - beta_2)`` and
    ``w -= lr sqrt(1 - beta_2^t) / (1 - beta_1^t) m / (sqrt(v) + epsilon)``. Sparse
    gradients, AMSGrad and adaptive epsilon go to Keras' own code.
    """

    def update_step(self, gradient: Any, variable: Any) -> Any:
        if (
            isinstance(gradient, tf.IndexedSlices)
            or self.amsgrad
            or getattr(self, "adaptive_epsilon", False)
        ):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        index = self._index_dict[self._var_key(variable)]
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(self.learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=gradient,
        )


@tf.custom_gradient
def _upsample2x_nearest(x: Any) -> Any:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2; gradient: 2x2 sums."""
    shape = tf.shape(x)
    y = tf.image.resize(x, tf.stack([2 * shape[1], 2 * shape[2]]), method="nearest")

    def grad(dy: Any) -> Any:
        return tf.nn.avg_pool2d(dy, 2, 2, "VALID") * tf.constant(4, dy.dtype)

    return y, grad


def _is_plain_nearest_2x(layer: Any) -> bool:
    return (
        type(layer) is tf.keras.layers.UpSampling2D
        and tuple(layer.size) == (2, 2)
        and layer.interpolation == "nearest"
        and layer.data_format == "channels_last"
    )


def fast_upsampling_gradients(net: Any) -> int:
    """Give ``net``'s 2x nearest ``UpSampling2D`` layers the sum-pool gradient.

    The layers compute the same output as before (the repeat, by the same resize op) and stay
    plain ``UpSampling2D`` layers in saved models; only the backward pass of this Python
    object changes. Call before the model is first traced (compile/fit).

    Returns:
        The number of layers changed.
    """
    changed = 0
    for layer in net.layers:
        if _is_plain_nearest_2x(layer):
            layer.call = types.MethodType(lambda self, inputs: _upsample2x_nearest(inputs), layer)
            changed += 1
    return changed


def _same_padded_conv(self: Any, inputs: Any) -> Any:
    """A stride-1 'valid' Conv2D's call for an input not yet padded: 'SAME' padding instead."""
    outputs = tf.nn.conv2d(
        inputs, self.kernel, strides=1, padding="SAME", dilations=self.dilation_rate
    )
    if self.use_bias:
        outputs = tf.nn.bias_add(outputs, self.bias)
    return outputs if self.activation is None else self.activation(outputs)


def _only_consumer(net: Any, layer: Any) -> Any:
    consumers = []
    for other in net.layers:
        try:
            inputs = tf.nest.flatten(other.input)
        except (AttributeError, ValueError):  # input layers; layers called several times
            continue
        if any(tensor is layer.output for tensor in inputs):
            consumers.append(other)
    return consumers[0] if len(consumers) == 1 else None


def fold_zero_padding(net: Any) -> int:
    """Let stride-1 convolutions pad their own input instead of a ZeroPadding2D layer before them.

    segmentation_models' ResNets zero-pad the input of every 3x3 convolution in a separate
    layer (a copy of the activation, and a slice of its gradient). oneDNN pads inside the
    convolution for free: a padding of (k - 1) / 2 on every side followed by a stride-1 'valid'
    k x k convolution is exactly a 'SAME' convolution. Strided pairs stay as they are ('SAME'
    pads them differently, and TensorFlow's explicit padding has no oneDNN gradient, which
    makes it far slower). Only pairs where the padding feeds that convolution alone change; the
    layers stay plain Keras layers in saved models. Call before the model is first traced.

    Returns:
        The number of ZeroPadding2D layers folded.
    """
    folded = 0
    for layer in net.layers:
        if type(layer) is not tf.keras.layers.ZeroPadding2D or layer.data_format != "channels_last":
            continue
        conv = _only_consumer(net, layer)
        if (
            type(conv) is not tf.keras.layers.Conv2D
            or conv.padding != "valid"
            or conv.data_format != "channels_last"
            or conv.groups != 1
            or tuple(conv.strides) != (1, 1)
            or tuple(conv.dilation_rate) != (1, 1)
            or any(k % 2 == 0 for k in conv.kernel_size)
            or tuple(tuple(side) for side in layer.padding)
            != tuple(((k - 1) // 2, (k - 1) // 2) for k in conv.kernel_size)
        ):
            continue
        conv.call = types.MethodType(_same_padded_conv, conv)
        layer.call = types.MethodType(lambda self, inputs: inputs, layer)
        folded += 1
    return folded


def unfuse_frozen_norm(layer: Any) -> None:
    """Run a frozen (inference-mode) BatchNormalization as a multiply-add, not the fused kernel.

    Same formula, ``x * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps))``;
    the choice is not part of the layer's saved configuration.
    """
    layer.fused = False
