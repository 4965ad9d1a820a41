//! Replays the committed seed corpus of the `cache_ops` fuzz target (`fuzz/corpus/cache_ops/`)
//! through the same function the fuzz target calls, [`kvvm::testing::fuzz_cache_ops`], so that
//! every seed and every crash ever found and fixed keeps passing without `cargo fuzz`.
//!
//! The hand-written seeds are defined here ([`seeds`]); `write_seed_corpus` (ignored) writes them
//! into the corpus directory:
//! `cargo test --features arbitrary --test fuzz_corpus -- --ignored write_seed_corpus`.

use std::path::PathBuf;

use kvvm::testing::{fuzz_cache_ops, FuzzInput, HarnessConfig, Op};
use kvvm::Layout;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/cache_ops")
}

fn config(layout: Layout, lookahead: usize, faults: bool, budget_pages: usize) -> HarnessConfig {
    HarnessConfig {
        layout,
        lookahead,
        faults,
        max_slots: 4,
        max_tokens: 199,
        budget_pages,
        zero_page: true,
    }
}

fn layout_name(l: Layout) -> &'static str {
    match l {
        Layout::Interleaved => "il",
        Layout::PerLayer => "pl",
    }
}

/// The hand-written seeds: (file name, input). Each exercises one behaviour the fuzzer should
/// start from.
fn seeds() -> Vec<(String, FuzzInput)> {
    use Op::*;
    let mut out = Vec::new();
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let n = layout_name(layout);
        let mut add = |name: &str, config: HarnessConfig, ops: Vec<Op>| {
            out.push((format!("seed-{n}-{name}"), FuzzInput { config, ops }));
        };
        // Prefill two requests, decode them, free one, admit another into its pages.
        let decode = vec![
            Alloc { hint: 120 },
            Alloc { hint: 40 },
            Ensure { k: 0, tokens: 100 },
            Ensure { k: 1, tokens: 37 },
            Decode { by: 1 },
            Decode { by: 1 },
            Decode { by: 9 },
            Free { k: 1 },
            Alloc { hint: 40 },
            Ensure { k: 1, tokens: 20 },
            Decode { by: 3 },
        ];
        add("decode", config(layout, 0, false, 36), decode.clone());
        add(
            "decode-mapper",
            config(layout, 4, false, 36),
            decode.clone(),
        );
        add("decode-mapper7", config(layout, 7, false, 64), decode);
        // Budget runs out: the failing growth changes nothing; freeing and reclaiming recovers.
        add(
            "budget",
            config(layout, 0, false, 8),
            vec![
                Alloc { hint: 199 },
                Alloc { hint: 199 },
                Ensure { k: 0, tokens: 150 },
                Ensure { k: 1, tokens: 199 },
                Free { k: 0 },
                Ensure { k: 0, tokens: 199 },
                Reclaim,
                Ensure { k: 0, tokens: 120 },
            ],
        );
        // Budget pressure with the mapper holding pages ahead of several slots.
        add(
            "budget-mapper",
            config(layout, 6, false, 12),
            vec![
                Alloc { hint: 10 },
                Alloc { hint: 10 },
                Alloc { hint: 10 },
                Step {
                    items: vec![(0, 30), (1, 30), (2, 30)],
                },
                Decode { by: 20 },
                Decode { by: 20 },
                Decode { by: 20 },
                Free { k: 1 },
                Decode { by: 40 },
                Ensure { k: 0, tokens: 199 },
                Reclaim,
            ],
        );
        // Shrink, then grow again past the old length.
        add(
            "shrink-regrow",
            config(layout, 0, false, 36),
            vec![
                Alloc { hint: 0 },
                Ensure { k: 0, tokens: 180 },
                Shrink { k: 0, tokens: 3 },
                Ensure { k: 0, tokens: 199 },
                Shrink { k: 0, tokens: 0 },
                Decode { by: 1 },
                Shrink { k: 0, tokens: 199 },
            ],
        );
        // A batch naming the same slot twice, and targets below the current length.
        add(
            "step-duplicates",
            config(layout, 2, false, 36),
            vec![
                Alloc { hint: 50 },
                Alloc { hint: 50 },
                Step {
                    items: vec![(0, 10), (1, 60), (0, 90), (2, 5)],
                },
                Step {
                    items: vec![(1, 1), (0, 0)],
                },
                Decode { by: 255 },
            ],
        );
        // Every slot taken, one more is refused; slots at max_tokens stay there.
        add(
            "slots-full",
            config(layout, 0, false, 64),
            vec![
                Alloc { hint: 1 },
                Alloc { hint: 1 },
                Alloc { hint: 1 },
                Alloc { hint: 1 },
                Alloc { hint: 1 },
                Ensure { k: 3, tokens: 199 },
                Decode { by: 7 },
                Free { k: 9 },
                Alloc { hint: 199 },
                Ensure {
                    k: 3,
                    tokens: 65535,
                },
            ],
        );
        // Injected failures: map during growth, unmap during shrink, page creation, release.
        for (kind, what) in [(0u8, "map"), (1, "unmap"), (2, "create"), (3, "release")] {
            for nth in [0u8, 1, 3] {
                add(
                    &format!("fault-{what}-{nth}"),
                    config(layout, 0, true, 20),
                    vec![
                        Alloc { hint: 60 },
                        Alloc { hint: 60 },
                        Ensure { k: 0, tokens: 40 },
                        Fault { kind, nth },
                        Step {
                            items: vec![(0, 120), (1, 90)],
                        },
                        Shrink { k: 0, tokens: 10 },
                        Free { k: 1 },
                        Reclaim,
                        Ensure { k: 0, tokens: 199 },
                        Decode { by: 5 },
                    ],
                );
            }
        }
        // A shrink whose second unmap fails leaves the slot uneven; growing it with the pool
        // short unmaps the surplus first, which fails too: the growth reports the backend's
        // failure, not an exhausted budget (found by the `per_layer_faults` model test).
        add(
            "fault-surplus-unmap",
            config(layout, 0, true, 16),
            vec![
                Alloc { hint: 199 },
                Ensure { k: 0, tokens: 199 },
                Fault { kind: 1, nth: 1 },
                Shrink { k: 0, tokens: 0 },
                Alloc { hint: 0 },
                Ensure { k: 1, tokens: 128 },
                Fault { kind: 1, nth: 0 },
                Ensure { k: 0, tokens: 128 },
                Ensure { k: 0, tokens: 128 },
                Decode { by: 3 },
            ],
        );
        // Faults while the mapper maps ahead.
        add(
            "fault-mapper",
            config(layout, 3, true, 24),
            vec![
                Alloc { hint: 20 },
                Ensure { k: 0, tokens: 16 },
                Fault { kind: 0, nth: 1 },
                Decode { by: 1 },
                Decode { by: 1 },
                Fault { kind: 1, nth: 0 },
                Shrink { k: 0, tokens: 2 },
                Decode { by: 30 },
            ],
        );
    }
    out.push((
        "seed-tiny".into(),
        FuzzInput {
            config: HarnessConfig {
                layout: Layout::PerLayer,
                lookahead: 1,
                faults: false,
                max_slots: 1,
                max_tokens: 1,
                budget_pages: 4,
                zero_page: true,
            },
            ops: vec![Op::Alloc { hint: 1 }, Op::Decode { by: 1 }, Op::Reclaim],
        },
    ));
    out
}

#[test]
fn seeds_encode_what_they_say() {
    for (name, input) in seeds() {
        let bytes = input.encode();
        assert_eq!(FuzzInput::decode(&bytes), input, "{name}");
    }
}

#[test]
fn any_bytes_decode() {
    // Short and odd inputs are inputs too (missing bytes read as zeros).
    for data in [&[][..], &[0xff], &[1, 2, 3], &[0xff; 64]] {
        let input = FuzzInput::decode(data);
        assert!(input.ops.len() <= FuzzInput::MAX_OPS);
        fuzz_cache_ops(data).unwrap_or_else(|e| panic!("{data:?}: {e}"));
    }
}

#[test]
fn seed_corpus_is_committed() {
    for (name, input) in seeds() {
        let path = corpus_dir().join(&name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run the ignored test write_seed_corpus)",
                path.display()
            )
        });
        assert_eq!(
            bytes,
            input.encode(),
            "{name} differs from its definition (run the ignored test write_seed_corpus)"
        );
    }
}

#[test]
fn replays_corpus() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("corpus directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= seeds().len(),
        "only {} corpus files",
        files.len()
    );
    let mut failures = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("read corpus file");
        if let Err(e) = fuzz_cache_ops(&data) {
            failures.push(format!("{}: {e}", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "writes the seed corpus; run by hand after changing seeds()"]
fn write_seed_corpus() {
    std::fs::create_dir_all(corpus_dir()).expect("create corpus directory");
    for (name, input) in seeds() {
        std::fs::write(corpus_dir().join(name), input.encode()).expect("write seed");
    }
}
