//! The one burn backend this crate runs on, and reading tensors back to the host. Internal.
//!
//! The networks are generic over burn's `Backend` (burn 0.21's API) but instantiated only with
//! [`Dispatch`]: a single backend type whose device (`DispatchDevice`) chooses flex, ndarray or
//! cuda at run time, with or without autodiff. [`BackendKind::device`](crate::BackendKind) maps
//! the configured backend onto it, so the backend stays a run-time choice and the heavy backend
//! code is compiled once, in burn, not once per backend in this crate.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

pub(crate) use burn::Dispatch;
pub(crate) type Device = burn::DispatchDevice;

/// The flex (CPU) device, without autodiff.
pub(crate) fn flex() -> Device {
    Device::Flex(burn::backend::flex::FlexDevice)
}

/// `device` with autodiff.
pub(crate) fn autodiff(device: Device) -> Device {
    Device::autodiff(device)
}

/// Reads a float tensor back to the host as f32 values, in row-major order.
///
/// # Errors
/// The device failed, or the values could not be read as f32.
pub(crate) fn read_f32<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Result<Vec<f32>, String> {
    let data = tensor.try_into_data().map_err(|e| e.to_string())?;
    // A no-op for f32 data (every backend here computes in f32).
    data.convert::<f32>().into_vec::<f32>().map_err(|e| format!("{e:?}"))
}

/// Reads a one-element float tensor back to the host.
///
/// # Errors
/// As [`read_f32`], or the tensor does not hold exactly one value.
pub(crate) fn read_scalar<B: Backend>(tensor: Tensor<B, 1>) -> Result<f32, String> {
    match read_f32(tensor)?.as_slice() {
        [v] => Ok(*v),
        other => Err(format!("expected one value, read {}", other.len())),
    }
}
