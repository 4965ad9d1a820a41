//! Model-based property tests of `KvCache` (proptest-state-machine), with and without injected
//! faults, in both layouts: after every operation the model's invariants hold and every live
//! token's K and V bytes read back exactly as written — tokens shared through the prefix index
//! (publish, alloc-with-prefix, eviction) included — and the pool's page and reference counts
//! equal what the slots and the prefix index hold.

use proptest::prelude::*;
use proptest::test_runner::Config;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

use kvvm::testing::{Harness, HarnessConfig, Op};
use kvvm::{Layout, SlotId};

/// The reference only tracks how many slots are live, so that it generates meaningful indices;
/// the harness holds the exact model.
#[derive(Clone, Debug)]
struct Reference {
    live: usize,
    config: HarnessConfig,
}

fn op_strategy(faults: bool) -> BoxedStrategy<Op> {
    let tokens = 0u16..=220;
    let mut ops = vec![
        (
            3,
            any::<u16>()
                .prop_map(|hint| Op::Alloc { hint: hint % 220 })
                .boxed(),
        ),
        (2, any::<u8>().prop_map(|k| Op::Free { k }).boxed()),
        (
            4,
            (any::<u8>(), tokens.clone())
                .prop_map(|(k, tokens)| Op::Ensure { k, tokens })
                .boxed(),
        ),
        (4, (1u8..=20).prop_map(|by| Op::Decode { by }).boxed()),
        (
            2,
            proptest::collection::vec((any::<u8>(), tokens.clone()), 1..4)
                .prop_map(|items| Op::Step { items })
                .boxed(),
        ),
        (
            2,
            (any::<u8>(), tokens)
                .prop_map(|(k, tokens)| Op::Shrink { k, tokens })
                .boxed(),
        ),
        (1, Just(Op::Reclaim).boxed()),
        (3, any::<u8>().prop_map(|k| Op::Publish { k }).boxed()),
        (
            4,
            (any::<u8>(), any::<u16>(), 0u8..40)
                .prop_map(|(src, len, extra)| Op::AllocPrefix { src, len, extra })
                .boxed(),
        ),
        (1, (0u8..4).prop_map(|n| Op::Evict { n }).boxed()),
    ];
    if faults {
        ops.push((
            3,
            (0u8..5, 0u8..4)
                .prop_map(|(kind, nth)| Op::Fault { kind, nth })
                .boxed(),
        ));
    }
    proptest::strategy::Union::new_weighted(ops).boxed()
}

macro_rules! model_test {
    ($name:ident, $machine:ident, $layout:expr, $lookahead:expr, $faults:expr $(, zero_page: $zero:expr)?) => {
        struct $machine;

        impl ReferenceStateMachine for $machine {
            type State = Reference;
            type Transition = Op;

            fn init_state() -> BoxedStrategy<Reference> {
                Just(Reference {
                    live: 0,
                    config: HarnessConfig {
                        layout: $layout,
                        lookahead: $lookahead,
                        faults: $faults,
                        $(zero_page: $zero,)?
                        ..HarnessConfig::default()
                    },
                })
                .boxed()
            }

            fn transitions(_state: &Reference) -> BoxedStrategy<Op> {
                op_strategy($faults)
            }

            fn apply(mut state: Reference, op: &Op) -> Reference {
                match op {
                    Op::Alloc { .. } | Op::AllocPrefix { .. } => {
                        state.live = (state.live + 1).min(state.config.max_slots)
                    }
                    Op::Free { .. } => state.live = state.live.saturating_sub(1),
                    _ => {}
                }
                state
            }
        }

        impl StateMachineTest for $machine {
            type SystemUnderTest = Harness;
            type Reference = $machine;

            fn init_test(state: &Reference) -> Harness {
                Harness::new(state.config).expect("harness")
            }

            fn apply(mut h: Harness, _state: &Reference, op: Op) -> Harness {
                if let Err(e) = h.apply(&op) {
                    panic!("after {op:?}: {e}");
                }
                h
            }

            fn check_invariants(h: &Harness, state: &Reference) {
                // With faults an allocation may fail (a free slot's shared pages could not be
                // unmapped); the harness checks the exact count against the cache itself.
                if !state.config.faults {
                    assert_eq!(h.live().len(), state.live, "live slot count");
                }
            }

            fn teardown(h: Harness) {
                h.finish().expect("no leak");
            }
        }

        prop_state_machine! {
            #![proptest_config(Config { cases: 256, failure_persistence: None, .. Config::default() })]
            #[test]
            fn $name(sequential 1..60 => $machine);
        }
    };
}

model_test!(
    interleaved_inline,
    InterleavedInline,
    Layout::Interleaved,
    0,
    false
);
model_test!(per_layer_inline, PerLayerInline, Layout::PerLayer, 0, false);
model_test!(
    interleaved_mapper,
    InterleavedMapper,
    Layout::Interleaved,
    4,
    false
);
model_test!(per_layer_mapper, PerLayerMapper, Layout::PerLayer, 4, false);
model_test!(
    interleaved_faults,
    InterleavedFaults,
    Layout::Interleaved,
    0,
    true
);
model_test!(per_layer_faults, PerLayerFaults, Layout::PerLayer, 0, true);
model_test!(
    interleaved_faults_mapper,
    InterleavedFaultsMapper,
    Layout::Interleaved,
    3,
    true
);

// The same without the zero page behind unmapped ranges (`PROT_NONE`, as before it existed).
model_test!(
    interleaved_no_zero_page,
    InterleavedNoZeroPage,
    Layout::Interleaved,
    2,
    true,
    zero_page: false
);
model_test!(
    per_layer_no_zero_page,
    PerLayerNoZeroPage,
    Layout::PerLayer,
    0,
    true,
    zero_page: false
);

/// The sequence `per_layer_faults` found (about one run in 24): a shrink whose second unmap fails
/// leaves the slot uneven (one buffer keeps its pages); a later growth of it, with the pool short,
/// first tries to unmap that buffer's surplus, and that unmap fails too. The growth must report
/// the backend's failure, not `BudgetExhausted`: the live tokens fit the budget. Kept as a fixed
/// regression (also a seed of the `cache_ops` fuzz corpus, `seed-pl-fault-surplus-unmap`).
#[test]
fn per_layer_faults_regression_surplus_unmap_failure() {
    use Op::*;
    let mut h = Harness::new(HarnessConfig {
        layout: Layout::PerLayer,
        lookahead: 0,
        faults: true,
        max_slots: 4,
        max_tokens: 199,
        budget_pages: 16,
        zero_page: true,
    })
    .expect("harness");
    let ops = [
        Alloc { hint: 199 },
        Ensure { k: 0, tokens: 199 },
        Fault { kind: 1, nth: 1 },
        Shrink { k: 0, tokens: 0 },
        Alloc { hint: 0 },
        Ensure { k: 1, tokens: 128 },
        Fault { kind: 1, nth: 0 },
        Ensure { k: 0, tokens: 128 },
        Ensure { k: 0, tokens: 128 },
        // 131 tokens in both slots would need 24 pages of 16: refused, nothing changes.
        Decode { by: 3 },
    ];
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = h.apply(op) {
            panic!("op {i} {op:?}: {e}");
        }
    }
    assert_eq!(h.live(), vec![(SlotId::new(0), 128), (SlotId::new(1), 128)]);
    h.finish().expect("no leak");
}

/// Found by `interleaved_faults_mapper` (about one run in 120): a published slot (read-only
/// pages) shrinks below them while both tries of its unmap fail, so the read-only pages stay
/// mapped beyond its live tokens; `reclaim_free_slots` then takes that surplus, which is right,
/// but the model expected the read-only tokens to stay ("slot 0 has 48 read-only tokens, model
/// 144"). The model now lets surplus read-only pages go down to what the live tokens' pages hold.
#[test]
fn interleaved_regression_reclaim_takes_surplus_read_only_pages() {
    use Op::*;
    let mut h = Harness::new(HarnessConfig {
        layout: Layout::Interleaved,
        lookahead: 3,
        faults: true,
        max_slots: 4,
        max_tokens: 200,
        budget_pages: 36,
        zero_page: true,
    })
    .expect("harness");
    let ops = [
        Alloc { hint: 0 },
        Step {
            items: vec![(0, 153)],
        },
        Publish { k: 0 },
        Fault { kind: 1, nth: 0 },
        Fault { kind: 1, nth: 1 },
        Ensure { k: 0, tokens: 0 },
        Shrink { k: 0, tokens: 48 },
        Reclaim,
    ];
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = h.apply(op) {
            panic!("op {i} {op:?}: {e}");
        }
    }
    assert_eq!(h.live(), vec![(SlotId::new(0), 48)]);
    h.finish().expect("no leak");
}
