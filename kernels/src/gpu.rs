//! The GPU launch path: compiles the CUDA sources with NVRTC for the device's compute capability,
//! loads them with `cuModuleLoadData`, and launches them with `cuLaunchKernel`, all through
//! `kvvm-sys` (the driver is loaded at run time, so this module builds everywhere).
//!
//! - [`GpuKernels::load`] prepares device `ordinal` (primary context made current on the calling
//!   thread) and the six entry points.
//! - [`launch_strided`] / [`launch_paged`] (unsafe) enqueue a kernel on device buffers.
//! - [`decode_attention_strided_gpu`] / [`decode_attention_paged_gpu`] (safe) upload host data,
//!   run, and download the result; the tests compare them with the CPU reference.

use std::ffi::c_void;

use half::{bf16, f16};
use kvvm_sys::result as cu;
use kvvm_sys::{CUdeviceptr, CUfunction, CUmodule, CUstream, PrimaryContext};

use crate::cpu::{check_paged, check_strided};
use crate::cuda::{self, HEAD_DIMS, MAX_GROUP, THREADS};
use crate::{BlockTable, DType, DecodeParams, KernelError, KvElement, KvView, PagedPool};

fn dtype_index(d: DType) -> usize {
    match d {
        DType::F16 => 0,
        DType::BF16 => 1,
        DType::F32 => 2,
    }
}

const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

/// The compiled and loaded kernels on one device. Dropping it unloads the modules and releases the
/// primary context retained by [`GpuKernels::load`].
#[derive(Debug)]
pub struct GpuKernels {
    /// The device's primary context: fields drop after `Drop::drop` has unloaded the modules,
    /// so the context is released last.
    ctx: PrimaryContext,
    arch: String,
    nvrtc_version: (i32, i32),
    code: cuda::CodeKind,
    modules: Vec<CUmodule>,
    strided: [CUfunction; 3],
    paged: [CUfunction; 3],
}

impl GpuKernels {
    /// Initializes the driver, retains device `ordinal`'s primary context and makes it current on
    /// the calling thread, compiles every source for the device's compute capability, and loads
    /// the modules.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`] if the driver or device is unavailable or a module cannot be loaded;
    /// [`KernelError::Nvrtc`] if compilation fails.
    pub fn load(ordinal: i32) -> Result<Self, KernelError> {
        let ctx = PrimaryContext::retain(ordinal)?;
        let dev = ctx.device();
        let major =
            cu::device::attribute(dev, kvvm_sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor =
            cu::device::attribute(dev, kvvm_sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let arch = format!("compute_{major}{minor}");
        let nvrtc_version = cuda::nvrtc_available()?;
        let mut this = GpuKernels {
            ctx,
            arch,
            nvrtc_version,
            code: cuda::CodeKind::Ptx,
            modules: Vec::new(),
            strided: [std::ptr::null_mut(); 3],
            paged: [std::ptr::null_mut(); 3],
        };
        // From here on, Drop unloads whatever was loaded, then the context is released.
        this.ctx.make_current()?;
        for (name, _) in cuda::SOURCES {
            let image = cuda::compile_for_device(name, major, minor)?;
            tracing::info!(
                "{name}: {} for {} with NVRTC {}.{}",
                image.kind.name(),
                image.target,
                nvrtc_version.0,
                nvrtc_version.1
            );
            this.code = image.kind;
            // SAFETY: `image.bytes` is a complete cubin (whose ELF headers give its size) or
            // NUL-terminated PTX, alive for the call.
            let module = unsafe { cu::module::load_data(image.bytes.as_ptr().cast()) }?;
            this.modules.push(module);
            for d in DTYPES {
                let (slot, entry) = if name.contains("strided") {
                    (&mut this.strided[dtype_index(d)], cuda::strided_entry(d))
                } else {
                    (&mut this.paged[dtype_index(d)], cuda::paged_entry(d))
                };
                // SAFETY: `module` is live (owned by `this`, unloaded only in Drop, after which the
                // function handles are gone too).
                *slot = unsafe { cu::module::get_function(module, &entry) }?;
            }
        }
        Ok(this)
    }

    /// Makes the device's primary context current on the calling thread.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn make_current(&self) -> Result<(), KernelError> {
        self.ctx.make_current()?;
        Ok(())
    }

    /// The device's virtual architecture, e.g. `compute_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether the loaded kernels are machine code (SASS) or PTX compiled by the driver.
    pub fn code_kind(&self) -> cuda::CodeKind {
        self.code
    }

    /// The version of NVRTC that compiled the kernels, `(major, minor)`.
    pub fn nvrtc_version(&self) -> (i32, i32) {
        self.nvrtc_version
    }
}

impl Drop for GpuKernels {
    fn drop(&mut self) {
        for m in self.modules.drain(..) {
            // SAFETY: each module was loaded by `load`, is unloaded once, and launches through
            // this value are synchronous with respect to its lifetime (the safe helpers
            // synchronize; the unsafe launchers require the caller to finish first).
            let _ = unsafe { cu::module::unload(m) };
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
    impl Sealed for u32 {}
}

/// Plain element types that may be copied to and from device memory byte for byte (sealed).
pub trait DevicePod: Copy + sealed::Sealed {}
impl DevicePod for f32 {}
impl DevicePod for f16 {}
impl DevicePod for bf16 {}
impl DevicePod for i32 {}
impl DevicePod for u32 {}

/// A device allocation (`cuMemAlloc`), freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    ptr: CUdeviceptr,
    bytes: usize,
}

impl DeviceBuffer {
    /// Allocates `bytes` bytes (at least 1) in the current context.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn alloc(bytes: usize) -> Result<Self, KernelError> {
        let bytes = bytes.max(1);
        Ok(Self {
            ptr: cu::mem::alloc(bytes)?,
            bytes,
        })
    }

    /// Allocates and copies `data` to the device.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn upload<T: DevicePod>(data: &[T]) -> Result<Self, KernelError> {
        let bytes = std::mem::size_of_val(data);
        let buf = Self::alloc(bytes)?;
        if bytes > 0 {
            // SAFETY: `data` is readable for `bytes` bytes; the allocation is at least that large
            // and owned by `buf`.
            unsafe { cu::mem::memcpy_htod(buf.ptr, data.as_ptr().cast::<c_void>(), bytes) }?;
        }
        Ok(buf)
    }

    /// Copies the first `out.len()` elements back to the host.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidParameter`] if the buffer is too small; [`KernelError::Cuda`].
    pub fn download<T: DevicePod>(&self, out: &mut [T]) -> Result<(), KernelError> {
        let bytes = std::mem::size_of_val(out);
        if bytes > self.bytes {
            return Err(KernelError::InvalidParameter(format!(
                "download of {bytes} bytes from a {}-byte buffer",
                self.bytes
            )));
        }
        if bytes > 0 {
            // SAFETY: `out` is writable for `bytes` bytes and exclusively borrowed; the device
            // range lies inside this allocation; `T` accepts any bit pattern (sealed POD types).
            unsafe { cu::mem::memcpy_dtoh(out.as_mut_ptr().cast::<c_void>(), self.ptr, bytes) }?;
        }
        Ok(())
    }

    /// The device address.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from mem_alloc, is freed once, and the safe helpers synchronize
        // before their buffers drop.
        let _ = unsafe { cu::mem::free(self.ptr) };
    }
}

/// A strided 4-D view in device memory: `[max_slots, max_tokens, kv_heads, head_dim]` with strides
/// in elements `[s_slot, s_token, s_head, 1]`, as kvvm's cache reports them.
#[derive(Clone, Copy, Debug)]
pub struct DeviceView {
    /// Device address of element `[0, 0, 0, 0]`.
    pub ptr: CUdeviceptr,
    /// Shape.
    pub shape: [usize; 4],
    /// Strides in elements.
    pub strides: [usize; 4],
}

/// Arguments of [`launch_strided`].
#[derive(Clone, Copy, Debug)]
pub struct StridedLaunch {
    /// Element type of K and V.
    pub dtype: DType,
    /// K view.
    pub k: DeviceView,
    /// V view (same shape as K).
    pub v: DeviceView,
    /// `i32 [batch]` slots.
    pub slots: CUdeviceptr,
    /// `i32 [batch]` lengths.
    pub lens: CUdeviceptr,
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// `f32 [batch, q_heads, head_dim]` queries.
    pub q: CUdeviceptr,
    /// `f32 [batch, q_heads, head_dim]` output.
    pub out: CUdeviceptr,
    /// Softmax scale.
    pub scale: f32,
}

/// Arguments of [`launch_paged`].
#[derive(Clone, Copy, Debug)]
pub struct PagedLaunch {
    /// Element type of the pools.
    pub dtype: DType,
    /// K pool `[num_blocks, block_size, kv_heads, head_dim]`.
    pub k_pool: CUdeviceptr,
    /// V pool, same shape.
    pub v_pool: CUdeviceptr,
    /// `u32 [batch, max_blocks_per_seq]` block table.
    pub block_table: CUdeviceptr,
    /// Entries per block table row.
    pub max_blocks_per_seq: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// `i32 [batch]` lengths.
    pub lens: CUdeviceptr,
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// `f32 [batch, q_heads, head_dim]` queries.
    pub q: CUdeviceptr,
    /// `f32 [batch, q_heads, head_dim]` output.
    pub out: CUdeviceptr,
    /// Softmax scale.
    pub scale: f32,
}

fn to_i32(what: &str, x: usize) -> Result<i32, KernelError> {
    i32::try_from(x).map_err(|_| KernelError::InvalidParameter(format!("{what} {x} exceeds i32")))
}

fn to_i64(what: &str, x: usize) -> Result<i64, KernelError> {
    i64::try_from(x).map_err(|_| KernelError::InvalidParameter(format!("{what} {x} exceeds i64")))
}

/// Checks the limits of the CUDA kernels; returns the launch geometry.
fn geometry(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<kvvm_sys::result::module::LaunchConfig, KernelError> {
    if kv_heads == 0 || q_heads == 0 || q_heads % kv_heads != 0 {
        return Err(KernelError::HeadsNotDivisible { q_heads, kv_heads });
    }
    if q_heads / kv_heads > MAX_GROUP {
        return Err(KernelError::InvalidParameter(format!(
            "GQA group {} exceeds the CUDA kernels' limit {MAX_GROUP}",
            q_heads / kv_heads
        )));
    }
    if !HEAD_DIMS.contains(&head_dim) {
        return Err(KernelError::InvalidParameter(format!(
            "head_dim {head_dim} not supported by the CUDA kernels ({HEAD_DIMS:?})"
        )));
    }
    let grid_y = u32::try_from(batch)
        .ok()
        .filter(|&b| b <= 65_535)
        .ok_or_else(|| KernelError::InvalidParameter(format!("batch {batch} exceeds 65535")))?;
    let grid_x = u32::try_from(kv_heads)
        .map_err(|_| KernelError::InvalidParameter("kv_heads exceeds u32".into()))?;
    Ok(kvvm_sys::result::module::LaunchConfig {
        grid: (grid_x, grid_y, 1),
        block: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Enqueues the strided kernel on `stream` (null: the legacy default stream).
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] / [`KernelError::ShapeMismatch`] for arguments outside the
/// kernels' limits (checked before anything is enqueued); [`KernelError::Cuda`] at submission.
///
/// # Safety
///
/// `kernels`' context must be current; every pointer must be device memory of that context, valid
/// and sized for the shapes given (K/V through their strides for every in-range index, `slots`
/// and `lens` with `batch` values each in range `slot < max_slots`, `1 <= len <= max_tokens`),
/// `out` writable and not overlapping the inputs, and all of it must stay valid until the kernel
/// completes.
pub unsafe fn launch_strided(
    kernels: &GpuKernels,
    a: &StridedLaunch,
    stream: CUstream,
) -> Result<(), KernelError> {
    if a.k.shape != a.v.shape {
        return Err(KernelError::ShapeMismatch(format!(
            "K view shape {:?} != V view shape {:?}",
            a.k.shape, a.v.shape
        )));
    }
    if a.k.strides[3] != 1 || a.v.strides[3] != 1 {
        return Err(KernelError::NonUnitInnerStride(
            a.k.strides[3].max(a.v.strides[3]),
        ));
    }
    let [_, _, kv_heads, head_dim] = a.k.shape;
    let cfg = geometry(a.batch, a.q_heads, kv_heads, head_dim)?;
    if a.batch == 0 {
        return Ok(());
    }
    let (mut out, mut q, mut k, mut v, mut slots, mut lens) =
        (a.out, a.q, a.k.ptr, a.v.ptr, a.slots, a.lens);
    let mut q_heads = to_i32("q_heads", a.q_heads)?;
    let mut kv_heads = to_i32("kv_heads", kv_heads)?;
    let mut head_dim = to_i32("head_dim", head_dim)?;
    let mut ks = [0i64; 3];
    let mut vs = [0i64; 3];
    for i in 0..3 {
        ks[i] = to_i64("stride", a.k.strides[i])?;
        vs[i] = to_i64("stride", a.v.strides[i])?;
    }
    let mut scale = a.scale;
    let mut params: [*mut c_void; 16] = [
        (&mut out as *mut CUdeviceptr).cast(),
        (&mut q as *mut CUdeviceptr).cast(),
        (&mut k as *mut CUdeviceptr).cast(),
        (&mut v as *mut CUdeviceptr).cast(),
        (&mut slots as *mut CUdeviceptr).cast(),
        (&mut lens as *mut CUdeviceptr).cast(),
        (&mut q_heads as *mut i32).cast(),
        (&mut kv_heads as *mut i32).cast(),
        (&mut head_dim as *mut i32).cast(),
        (&mut ks[0] as *mut i64).cast(),
        (&mut ks[1] as *mut i64).cast(),
        (&mut ks[2] as *mut i64).cast(),
        (&mut vs[0] as *mut i64).cast(),
        (&mut vs[1] as *mut i64).cast(),
        (&mut vs[2] as *mut i64).cast(),
        (&mut scale as *mut f32).cast(),
    ];
    let f = kernels.strided[dtype_index(a.dtype)];
    // SAFETY: `f` is a live function of `kernels`' modules; `params` has one pointer per kernel
    // parameter (16, matching KVVM_STRIDED_ENTRY's types: 6 pointers, 3 ints, 6 long longs, 1
    // float), each alive for this call; the caller guarantees the memory contract.
    unsafe { cu::module::launch_kernel(f, cfg, stream, &mut params) }?;
    Ok(())
}

/// Enqueues the paged kernel on `stream` (null: the legacy default stream).
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] for arguments outside the kernels' limits;
/// [`KernelError::Cuda`] at submission.
///
/// # Safety
///
/// `kernels`' context must be current; the pools must hold `num_blocks` whole blocks, the block
/// table `batch * max_blocks_per_seq` ids of which every one a sequence needs is `< num_blocks`,
/// `lens` `batch` values in `1..=max_blocks_per_seq*block_size`; `q`/`out` sized
/// `batch*q_heads*head_dim` f32, `out` writable and not overlapping the inputs; all valid until the
/// kernel completes.
pub unsafe fn launch_paged(
    kernels: &GpuKernels,
    a: &PagedLaunch,
    stream: CUstream,
) -> Result<(), KernelError> {
    let cfg = geometry(a.batch, a.q_heads, a.kv_heads, a.head_dim)?;
    if a.block_size == 0 || a.max_blocks_per_seq == 0 {
        return Err(KernelError::InvalidParameter(
            "block_size and max_blocks_per_seq must be positive".into(),
        ));
    }
    if a.batch == 0 {
        return Ok(());
    }
    let (mut out, mut q, mut kp, mut vp, mut table, mut lens) =
        (a.out, a.q, a.k_pool, a.v_pool, a.block_table, a.lens);
    let mut max_blocks = to_i32("max_blocks_per_seq", a.max_blocks_per_seq)?;
    let mut block_size = to_i32("block_size", a.block_size)?;
    let mut q_heads = to_i32("q_heads", a.q_heads)?;
    let mut kv_heads = to_i32("kv_heads", a.kv_heads)?;
    let mut head_dim = to_i32("head_dim", a.head_dim)?;
    let mut scale = a.scale;
    let mut params: [*mut c_void; 12] = [
        (&mut out as *mut CUdeviceptr).cast(),
        (&mut q as *mut CUdeviceptr).cast(),
        (&mut kp as *mut CUdeviceptr).cast(),
        (&mut vp as *mut CUdeviceptr).cast(),
        (&mut table as *mut CUdeviceptr).cast(),
        (&mut lens as *mut CUdeviceptr).cast(),
        (&mut max_blocks as *mut i32).cast(),
        (&mut block_size as *mut i32).cast(),
        (&mut q_heads as *mut i32).cast(),
        (&mut kv_heads as *mut i32).cast(),
        (&mut head_dim as *mut i32).cast(),
        (&mut scale as *mut f32).cast(),
    ];
    let f = kernels.paged[dtype_index(a.dtype)];
    // SAFETY: `f` is a live function of `kernels`' modules; `params` has one pointer per kernel
    // parameter (12, matching KVVM_PAGED_ENTRY: 6 pointers, 5 ints, 1 float), each alive for this
    // call; the caller guarantees the memory contract.
    unsafe { cu::module::launch_kernel(f, cfg, stream, &mut params) }?;
    Ok(())
}

/// A strided view into a host buffer, for [`decode_attention_strided_gpu`]: the view starts
/// `offset` elements into `buf`.
#[derive(Clone, Copy, Debug)]
pub struct HostStrided<'a, T> {
    /// The whole buffer (uploaded as is).
    pub buf: &'a [T],
    /// Offset of element `[0, 0, 0, 0]`.
    pub offset: usize,
    /// `[max_slots, max_tokens, kv_heads, head_dim]`.
    pub shape: [usize; 4],
    /// Strides in elements.
    pub strides: [usize; 4],
}

fn lens_i32(lens: impl Iterator<Item = usize>) -> Result<Vec<i32>, KernelError> {
    lens.map(|l| to_i32("length", l)).collect()
}

/// Uploads `k`/`v` (once if they share a buffer), runs the strided kernel on the GPU and returns
/// `out [batch, q_heads, head_dim]`. Validation is that of
/// [`decode_attention_strided`](crate::decode_attention_strided) plus the CUDA kernels' limits.
///
/// # Errors
///
/// As [`decode_attention_strided`](crate::decode_attention_strided) and [`launch_strided`].
pub fn decode_attention_strided_gpu<T: KvElement + DevicePod>(
    kernels: &GpuKernels,
    k: HostStrided<'_, T>,
    v: HostStrided<'_, T>,
    batch: &[(usize, usize)],
    q: &[f32],
    params: &DecodeParams,
) -> Result<Vec<f32>, KernelError> {
    fn view<'a, T: KvElement>(h: &HostStrided<'a, T>) -> Result<KvView<'a, T>, KernelError> {
        KvView::from_slice(h.buf.get(h.offset..).unwrap_or(&[]), h.shape, h.strides)
    }
    let (kv, vv) = (view(&k)?, view(&v)?);
    kernels.make_current()?;
    check_strided(kv.shape(), vv.shape(), batch, q, q.len(), params)?;
    let [_, _, kv_heads, head_dim] = kv.shape();
    geometry(batch.len(), params.q_heads, kv_heads, head_dim)?;
    let elem = std::mem::size_of::<T>() as u64;
    let k_dev = DeviceBuffer::upload(k.buf)?;
    let shared = std::ptr::eq(k.buf, v.buf);
    let v_dev = if shared {
        None
    } else {
        Some(DeviceBuffer::upload(v.buf)?)
    };
    let v_base = v_dev.as_ref().map_or(k_dev.ptr(), DeviceBuffer::ptr);
    let slots = lens_i32(batch.iter().map(|b| b.0))?;
    let lens = lens_i32(batch.iter().map(|b| b.1))?;
    let slots_dev = DeviceBuffer::upload(&slots)?;
    let lens_dev = DeviceBuffer::upload(&lens)?;
    let q_dev = DeviceBuffer::upload(q)?;
    let out_dev = DeviceBuffer::alloc(std::mem::size_of_val(q))?;
    let launch = StridedLaunch {
        dtype: T::DTYPE,
        k: DeviceView {
            ptr: k_dev.ptr() + k.offset as u64 * elem,
            shape: k.shape,
            strides: k.strides,
        },
        v: DeviceView {
            ptr: v_base + v.offset as u64 * elem,
            shape: v.shape,
            strides: v.strides,
        },
        slots: slots_dev.ptr(),
        lens: lens_dev.ptr(),
        batch: batch.len(),
        q_heads: params.q_heads,
        q: q_dev.ptr(),
        out: out_dev.ptr(),
        scale: params.scale_for(head_dim),
    };
    // SAFETY: `kernels`' context was made current above; every buffer was uploaded from slices that `from_slice` and `check_strided` validated for these
    // shapes, slots and lengths; `out` is a separate allocation; we synchronize before the
    // buffers drop.
    unsafe { launch_strided(kernels, &launch, std::ptr::null_mut()) }?;
    cu::ctx::synchronize()?;
    let mut out = vec![0f32; q.len()];
    out_dev.download(&mut out)?;
    Ok(out)
}

/// Uploads the pool and table, runs the paged kernel on the GPU and returns
/// `out [batch, q_heads, head_dim]`. Validation is that of
/// [`decode_attention_paged`](crate::decode_attention_paged) plus the CUDA kernels' limits.
///
/// # Errors
///
/// As [`decode_attention_paged`](crate::decode_attention_paged) and [`launch_paged`].
pub fn decode_attention_paged_gpu<T: KvElement + DevicePod>(
    kernels: &GpuKernels,
    pool: &PagedPool<'_, T>,
    table: &BlockTable<'_>,
    lens: &[usize],
    q: &[f32],
    params: &DecodeParams,
) -> Result<Vec<f32>, KernelError> {
    check_paged(pool, table, lens, q, q.len(), params)?;
    geometry(lens.len(), params.q_heads, pool.kv_heads(), pool.head_dim())?;
    kernels.make_current()?;
    let k_dev = DeviceBuffer::upload(pool.k())?;
    let v_dev = DeviceBuffer::upload(pool.v())?;
    let table_dev = DeviceBuffer::upload(table.ids())?;
    let lens_dev = DeviceBuffer::upload(&lens_i32(lens.iter().copied())?)?;
    let q_dev = DeviceBuffer::upload(q)?;
    let out_dev = DeviceBuffer::alloc(std::mem::size_of_val(q))?;
    let launch = PagedLaunch {
        dtype: T::DTYPE,
        k_pool: k_dev.ptr(),
        v_pool: v_dev.ptr(),
        block_table: table_dev.ptr(),
        max_blocks_per_seq: table.max_blocks_per_seq(),
        block_size: pool.block_size(),
        lens: lens_dev.ptr(),
        batch: lens.len(),
        q_heads: params.q_heads,
        kv_heads: pool.kv_heads(),
        head_dim: pool.head_dim(),
        q: q_dev.ptr(),
        out: out_dev.ptr(),
        scale: params.scale_for(pool.head_dim()),
    };
    // SAFETY: as in `decode_attention_strided_gpu`: buffers uploaded from validated slices (every
    // needed block id < num_blocks, lengths within the table), `out` separate, synchronized before
    // drop.
    unsafe { launch_paged(kernels, &launch, std::ptr::null_mut()) }?;
    cu::ctx::synchronize()?;
    let mut out = vec![0f32; q.len()];
    out_dev.download(&mut out)?;
    Ok(out)
}
