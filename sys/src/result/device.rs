//! Devices: count, handles, names, attributes, memory.

#[allow(unused_imports)]
use super::*;

/// `cuDeviceGetCount`: the number of visible devices.
///
/// # Errors
/// A loading or driver error (`CUDA_ERROR_NOT_INITIALIZED` before [`super::init`]).
pub fn count() -> Result<i32, DriverError> {
    let d = driver()?;
    let mut n: c_int = 0;
    // SAFETY: `n` is a valid out-pointer for the duration of the call.
    d.check(unsafe { (d.cuDeviceGetCount)(&mut n) }, "cuDeviceGetCount")?;
    Ok(n)
}

/// `cuDeviceGet`: the device handle of ordinal `ordinal`.
///
/// # Errors
/// `CUDA_ERROR_INVALID_DEVICE` for an ordinal out of range.
pub fn get(ordinal: i32) -> Result<CUdevice, DriverError> {
    let d = driver()?;
    let mut dev: CUdevice = 0;
    // SAFETY: `dev` is a valid out-pointer; any ordinal is accepted (and validated).
    d.check(unsafe { (d.cuDeviceGet)(&mut dev, ordinal) }, "cuDeviceGet")?;
    Ok(dev)
}

/// `cuDeviceGetName`: the device's product name.
///
/// # Errors
/// A driver error for an invalid device.
pub fn name(dev: CUdevice) -> Result<String, DriverError> {
    let d = driver()?;
    let mut buf = [0 as c_char; 256];
    let len = buf.len() as c_int;
    d.check(
        // SAFETY: `buf` is writable for `len` bytes; the driver writes at most `len` bytes including
        // the terminating NUL.
        unsafe { (d.cuDeviceGetName)(buf.as_mut_ptr(), len, dev) },
        "cuDeviceGetName",
    )?;
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `cuDeviceGetAttribute`.
///
/// # Errors
/// A driver error for an invalid device or an attribute the driver does not know.
pub fn attribute(dev: CUdevice, attribute: CUdevice_attribute) -> Result<i32, DriverError> {
    let d = driver()?;
    let mut v: c_int = 0;
    d.check(
        // SAFETY: `v` is a valid out-pointer; device and attribute are validated by the driver.
        unsafe { (d.cuDeviceGetAttribute)(&mut v, attribute, dev) },
        "cuDeviceGetAttribute",
    )?;
    Ok(v)
}

/// `cuDeviceTotalMem_v2`: the device's memory in bytes.
///
/// # Errors
/// A driver error for an invalid device.
pub fn total_mem(dev: CUdevice) -> Result<usize, DriverError> {
    let d = driver()?;
    let mut bytes: usize = 0;
    d.check(
        // SAFETY: `bytes` is a valid out-pointer; the device is validated by the driver.
        unsafe { (d.cuDeviceTotalMem_v2)(&mut bytes, dev) },
        "cuDeviceTotalMem_v2",
    )?;
    Ok(bytes)
}
