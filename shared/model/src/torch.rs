//! The PyTorch layout of a fedhcc model's tensors (what `fedhcc export --layout torch` writes), the
//! mapping burn-store's `BurnToPyTorchAdapter` applies to a burn module:
//!
//! - a `Linear` weight, which burn stores `[inputs, outputs]`, becomes `[outputs, inputs]`
//!   (transposed), PyTorch's `nn.Linear.weight`;
//! - a `GroupNorm`'s `gamma` and `beta` become `weight` and `bias`;
//! - everything else keeps its name and shape: `Linear` biases, `Conv3d` weights (burn already stores
//!   them `[out, in / groups, k, k, k]`, as PyTorch does) and biases, and the standardisation tensors
//!   (`standardise.<group>.mean` / `.std`, buffers on the PyTorch side).
//!
//! In fedhcc's models every 2-D tensor named `….weight` belongs to a `Linear` and every `….gamma` /
//! `….beta` to a `GroupNorm` (the tests check this against the container types burn's module visitor
//! reports), so the mapping is a rule on a tensor's name and shape: it needs neither burn nor the
//! model's configuration, and a reader maps a file back onto the layout it expects.

use fedhcc_core::params::TensorSpec;

/// Where a tensor of the fedhcc layout sits in the PyTorch layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchTensor {
    /// The PyTorch parameter (or buffer) name.
    pub name: String,
    /// Its shape in PyTorch.
    pub shape: Vec<usize>,
    /// Whether the values are the transpose of fedhcc's (a `Linear` weight).
    pub transposed: bool,
}

/// The PyTorch name and shape of the fedhcc tensor `spec`.
pub fn torch_tensor(spec: &TensorSpec) -> TorchTensor {
    let renamed = |from: &str, to: &str| spec.name.strip_suffix(from).map(|stem| format!("{stem}{to}"));
    if let Some(name) = renamed(".gamma", ".weight").or_else(|| renamed(".beta", ".bias")) {
        return TorchTensor { name, shape: spec.shape.clone(), transposed: false };
    }
    if spec.name.ends_with(".weight")
        && let [rows, cols] = spec.shape[..]
    {
        return TorchTensor { name: spec.name.clone(), shape: vec![cols, rows], transposed: true };
    }
    TorchTensor { name: spec.name.clone(), shape: spec.shape.clone(), transposed: false }
}

/// The transpose of a row-major `rows × cols` matrix (row-major `cols × rows`). Applied twice it
/// gives the values back, bit for bit.
///
/// # Panics
/// When `values` does not hold `rows · cols` values.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(values.len(), rows * cols, "a {rows} × {cols} matrix");
    let mut out = vec![0.0; values.len()];
    for (r, row) in values.chunks_exact(cols.max(1)).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    use burn::tensor::backend::Backend;

    use super::*;
    use crate::backend::{Dispatch, flex};
    use crate::config::ClinicalModelConfig;
    use crate::fusion::{MultimodalNet, init_multimodal_params, tiny};
    use crate::layout::init_params;
    use crate::mm_config::{MultimodalConfig, MultimodalKind};
    use crate::net::Mlp;
    use crate::{convert, model_layout, multimodal_layout};

    /// Every float parameter with the burn module type that holds it (what burn-store's adapters
    /// match on: the innermost `Struct:` container).
    #[derive(Default)]
    struct Containers {
        path: Vec<String>,
        stack: Vec<String>,
        found: Vec<(TensorSpec, String)>,
    }

    impl<B: Backend> ModuleVisitor<B> for Containers {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.push(name.to_string());
            self.stack.push(container_type.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
            self.stack.pop();
        }

        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let owner = self.stack.iter().rev().find(|c| c.starts_with("Struct:")).cloned().unwrap_or_default();
            let spec = TensorSpec { name: self.path.join("."), shape: param.lazy_shape().as_slice().to_vec() };
            self.found.push((spec, owner));
        }
    }

    /// burn-store 0.22's `adapt_pytorch_tensor` (Burn → PyTorch), written out from its source.
    fn burn_store_rule(spec: &TensorSpec, owner: &str) -> TorchTensor {
        let (stem, param) = spec.name.rsplit_once('.').unwrap_or(("", spec.name.as_str()));
        let with = |p: &str| if stem.is_empty() { p.to_string() } else { format!("{stem}.{p}") };
        match (owner, param) {
            ("Struct:Linear", "weight") if spec.shape.len() == 2 => {
                TorchTensor { name: spec.name.clone(), shape: vec![spec.shape[1], spec.shape[0]], transposed: true }
            }
            ("Struct:GroupNorm" | "Struct:LayerNorm" | "Struct:BatchNorm" | "Struct:RmsNorm", "gamma") => {
                TorchTensor { name: with("weight"), shape: spec.shape.clone(), transposed: false }
            }
            ("Struct:GroupNorm" | "Struct:LayerNorm" | "Struct:BatchNorm" | "Struct:RmsNorm", "beta") => {
                TorchTensor { name: with("bias"), shape: spec.shape.clone(), transposed: false }
            }
            _ => TorchTensor { name: spec.name.clone(), shape: spec.shape.clone(), transposed: false },
        }
    }

    fn containers<B: Backend, M: Module<B>>(module: &M) -> Vec<(TensorSpec, String)> {
        let mut v = Containers::default();
        module.visit(&mut v);
        v.found
    }

    #[test]
    fn the_rule_is_burn_stores_pytorch_adapter_on_every_model() {
        let device = flex();
        let mut owners = std::collections::BTreeSet::new();
        let mut check = |found: Vec<(TensorSpec, String)>, layout: &fedhcc_core::params::Layout| {
            let specs: Vec<&TensorSpec> = found.iter().map(|(s, _)| s).collect();
            assert_eq!(specs, layout.specs().iter().collect::<Vec<_>>(), "the visitor sees the declared layout");
            for (spec, owner) in &found {
                assert_eq!(torch_tensor(spec), burn_store_rule(spec, owner), "{} in {owner}", spec.name);
                owners.insert(owner.clone());
            }
        };
        for hidden in [vec![], vec![8], vec![5, 3]] {
            let cfg = ClinicalModelConfig { inputs: 6, hidden, dropout: 0.0 };
            let mlp = convert::import(Mlp::<Dispatch>::new(&cfg, &device), &init_params(&cfg, 1)).unwrap();
            check(containers(&mlp), &model_layout(&cfg).unwrap());
        }
        for kind in [MultimodalKind::Preop, MultimodalKind::Postop] {
            for cfg in [tiny(kind), MultimodalConfig::new(kind, 20)] {
                let params = init_multimodal_params(&cfg, 1).unwrap();
                let net = convert::import(MultimodalNet::<Dispatch>::new(&cfg, &device), &params).unwrap();
                check(containers(&net), &multimodal_layout(&cfg).unwrap());
            }
        }
        // Not vacuous: every module kind the models are built of was seen.
        for owner in ["Struct:Linear", "Struct:GroupNorm", "Struct:Conv3d"] {
            assert!(owners.contains(owner), "{owner} not among {owners:?}");
        }
    }

    #[test]
    fn names_and_shapes_of_each_kind_of_tensor() {
        let t = |name: &str, shape: &[usize]| torch_tensor(&TensorSpec { name: name.into(), shape: shape.to_vec() });
        let same =
            |name: &str, shape: &[usize]| TorchTensor { name: name.into(), shape: shape.to_vec(), transposed: false };
        assert_eq!(
            t("layers.0.weight", &[4, 32]),
            TorchTensor { name: "layers.0.weight".into(), shape: vec![32, 4], transposed: true }
        );
        assert_eq!(t("layers.0.bias", &[32]), same("layers.0.bias", &[32]));
        assert_eq!(t("mri.stages.0.conv.weight", &[8, 5, 3, 3, 3]), same("mri.stages.0.conv.weight", &[8, 5, 3, 3, 3]));
        assert_eq!(t("mri.stages.0.norm.gamma", &[8]), same("mri.stages.0.norm.weight", &[8]));
        assert_eq!(t("mri.stages.0.norm.beta", &[8]), same("mri.stages.0.norm.bias", &[8]));
        assert_eq!(t("standardise.clinical.mean", &[7]), same("standardise.clinical.mean", &[7]));
        assert_eq!(t("block0.weight", &[100]), same("block0.weight", &[100]), "a 1-D weight is no Linear's");
    }

    #[test]
    fn transpose_is_a_transpose_and_its_own_inverse() {
        let v: Vec<f32> = (0..6).map(|i| i as f32).collect();
        // [[0 1 2] [3 4 5]] → [[0 3] [1 4] [2 5]]
        assert_eq!(transpose(&v, 2, 3), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(transpose(&transpose(&v, 2, 3), 3, 2), v);
        assert_eq!(transpose(&[], 0, 5), Vec::<f32>::new());
        assert_eq!(transpose(&[1.0, 2.0], 1, 2), vec![1.0, 2.0]);
    }
}
