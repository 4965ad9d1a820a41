//! Compiles every CUDA source of kvvm-kernels to PTX for compute_80 and compute_90 with NVRTC and
//! prints the PTX sizes; exits non-zero if NVRTC cannot be loaded or a compilation fails.
//!
//! ```text
//! pip install nvidia-cuda-nvrtc   # CUDA 13 (nvidia/cu13/lib); nvidia-cuda-nvrtc-cu12 for CUDA 12
//! export KVVM_NVRTC_PATH=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))')
//! cargo run -p kvvm-kernels --example nvrtc_check
//! ```

use std::process::ExitCode;

use kvvm_kernels::cuda;

fn main() -> ExitCode {
    match cuda::nvrtc_available() {
        Ok((major, minor)) => println!("NVRTC {major}.{minor}"),
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("hint: set KVVM_NVRTC_PATH to the directory holding libnvrtc.so.13 or .12");
            return ExitCode::FAILURE;
        }
    }
    let mut failed = false;
    for arch in cuda::ARCHS {
        match cuda::compile_all(arch) {
            Ok(ptx) => {
                for (name, text) in ptx {
                    println!("{arch:<11} {name:<20} {:>8} bytes of PTX", text.len());
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
