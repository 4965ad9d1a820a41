//! Compiles every CUDA source for compute_80 and compute_90 with NVRTC, when NVRTC can be loaded
//! (set KVVM_NVRTC_PATH, e.g. to the `nvidia/cu13/lib` folder of the CUDA 13 wheels); otherwise
//! prints why and passes.

use kvvm_kernels::cuda::{self, ARCHS, SOURCES};
use kvvm_kernels::DType;

#[test]
fn every_source_compiles_for_every_arch() {
    let (major, minor) = match cuda::nvrtc_available() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("skipped: NVRTC cannot be loaded ({e}); set KVVM_NVRTC_PATH");
            return;
        }
    };
    eprintln!("NVRTC {major}.{minor}");
    for arch in ARCHS {
        let ptx = cuda::compile_all(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(ptx.len(), SOURCES.len());
        let target = format!(".target {}", arch.replace("compute_", "sm_"));
        for (name, text) in &ptx {
            assert!(text.contains(&target), "{name} {arch}: no {target}");
            let entries: Vec<String> = if name.contains("strided") {
                [DType::F16, DType::BF16, DType::F32]
                    .iter()
                    .map(|d| cuda::strided_entry(*d))
                    .collect()
            } else {
                [DType::F16, DType::BF16, DType::F32]
                    .iter()
                    .map(|d| cuda::paged_entry(*d))
                    .collect()
            };
            for e in entries {
                assert!(
                    text.contains(&format!(".visible .entry {e}(")),
                    "{name} {arch}: no entry {e}"
                );
            }
            // The per-thread accumulators must stay in registers.
            assert!(!text.contains(".local"), "{name} {arch}: uses local memory");
            eprintln!("{name} {arch}: {} bytes of PTX", text.len());
        }
    }
}

#[test]
fn bad_arch_and_source_are_errors() {
    assert!(cuda::virtual_arch("compute_80").is_ok());
    assert_eq!(cuda::virtual_arch("sm_90").unwrap(), "compute_90");
    assert_eq!(cuda::virtual_arch("90a").unwrap(), "compute_90a");
    assert!(cuda::virtual_arch("--foo").is_err());
    assert!(cuda::virtual_arch("").is_err());
    assert!(cuda::compile("nope.cu", "compute_80").is_err());
    assert!(cuda::compile_all("x86").is_err());
    assert!(cuda::full_source("decode_paged.cu")
        .unwrap()
        .contains("kvvm_decode_group"));
}

#[test]
fn device_images_are_machine_code_when_nvrtc_can() {
    let (major, minor) = match cuda::nvrtc_available() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("skipped: NVRTC cannot be loaded ({e}); set KVVM_NVRTC_PATH");
            return;
        }
    };
    let sass = kvvm_sys::nvrtc().unwrap().has_cubin();
    for (cc_major, cc_minor) in [(8, 0), (9, 0)] {
        for (name, _) in SOURCES {
            let image = cuda::compile_for_device(name, cc_major, cc_minor).unwrap();
            if sass {
                assert_eq!(image.kind, cuda::CodeKind::Sass, "NVRTC {major}.{minor}");
                assert_eq!(image.target, format!("sm_{cc_major}{cc_minor}"));
                assert_eq!(&image.bytes[..4], b"\x7fELF");
            } else {
                assert_eq!(image.kind, cuda::CodeKind::Ptx);
                assert_eq!(image.bytes.last(), Some(&0));
            }
            eprintln!(
                "{name} sm_{cc_major}{cc_minor}: {} bytes of {}",
                image.bytes.len(),
                image.kind.name()
            );
        }
    }
    assert!(cuda::compile_for_device("nope.cu", 9, 0).is_err());
}
