//! Module ⇄ [`ParameterSet`], bit-exact, through burn's `ModuleVisitor` (export) and
//! `ModuleMapper` (import).
//!
//! The path of a parameter is the stack of `enter_module` names (`layers`, `0`, `weight`), joined
//! with dots. Export goes through `Param::transform_for_save` and import through
//! `Param::transform_for_load`, so a parameter's save/load mappers (for example a column-layout
//! `Linear`'s transpose) and its device and `require_grad` setting are honoured.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use fedhcc_core::params::ParameterSet;

use crate::backend::read_f32;

/// Reads every float parameter of `module` into a [`ParameterSet`], in visiting order.
///
/// # Errors
/// A message naming a tensor that could not be read back from the device.
pub(crate) fn export<B: Backend, M: Module<B>>(module: &M) -> Result<ParameterSet, String> {
    let mut exporter = Exporter::default();
    module.visit(&mut exporter);
    if let Some(e) = exporter.error {
        return Err(e);
    }
    ParameterSet::from_tensors(exporter.tensors).map_err(|e| e.to_string())
}

/// Replaces every float parameter of `module` with the same-named tensor of `params`.
///
/// The caller has already checked that `params` has this module's layout; anything still missing
/// or misshapen is reported rather than silently kept.
///
/// # Errors
/// A message naming each missing or misshapen tensor.
pub(crate) fn import<B: Backend, M: Module<B>>(module: M, params: &ParameterSet) -> Result<M, String> {
    let values = params.tensors().map(|(spec, v)| (spec.name.as_str(), (spec.shape.as_slice(), v))).collect();
    let mut importer = Importer { path: Vec::new(), values, problems: Vec::new(), loaded: 0 };
    let module = module.map(&mut importer);
    if !importer.problems.is_empty() {
        return Err(importer.problems.join("; "));
    }
    if importer.loaded != params.layout().specs().len() {
        return Err(format!("{} tensors given but the model has {}", params.layout().specs().len(), importer.loaded));
    }
    Ok(module)
}

#[derive(Default)]
struct Exporter {
    path: Vec<String>,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    error: Option<String>,
}

impl<B: Backend> ModuleVisitor<B> for Exporter {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = self.path.join(".");
        let tensor = param.transform_for_save().val();
        let shape = tensor.dims().to_vec();
        match read_f32(tensor) {
            Ok(values) => self.tensors.push((name, shape, values)),
            Err(e) => {
                self.error.get_or_insert_with(|| format!("reading tensor '{name}' from the device: {e}"));
            }
        }
    }
}

struct Importer<'a> {
    path: Vec<String>,
    values: HashMap<&'a str, (&'a [usize], &'a [f32])>,
    problems: Vec<String>,
    loaded: usize,
}

impl<B: Backend> ModuleMapper<B> for Importer<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join(".");
        let Some(&(shape, values)) = self.values.get(name.as_str()) else {
            self.problems.push(format!("tensor '{name}' is missing"));
            return param;
        };
        // Parameters built by `Mlp::new` are still lazy: `lazy_shape` and `transform_for_load`
        // never run their initialiser.
        let expected = param.lazy_shape();
        if expected.as_slice() != shape {
            self.problems.push(format!("tensor '{name}' has shape {shape:?} but the model expects {expected:?}"));
            return param;
        }
        let tensor = Tensor::<B, D>::from_data(TensorData::new(values.to_vec(), shape.to_vec()), &param.lazy_device());
        self.loaded += 1;
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Dispatch, autodiff, flex};
    use crate::config::ClinicalModelConfig;
    use crate::layout::{init_params, model_layout};
    use crate::net::Mlp;

    fn cfg() -> ClinicalModelConfig {
        ClinicalModelConfig { inputs: 4, hidden: vec![32], dropout: 0.0 }
    }

    fn bits(p: &ParameterSet) -> Vec<u32> {
        p.values().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn burn_names_and_shapes_match_the_declared_layout() {
        let exported =
            export(&import(Mlp::<Dispatch>::new(&cfg(), &flex()), &init_params(&cfg(), 1)).unwrap()).unwrap();
        assert_eq!(exported.layout(), &model_layout(&cfg()).unwrap());
        let deep = ClinicalModelConfig { inputs: 3, hidden: vec![5, 2], dropout: 0.0 };
        let exported = export(&import(Mlp::<Dispatch>::new(&deep, &flex()), &init_params(&deep, 1)).unwrap()).unwrap();
        assert_eq!(exported.layout(), &model_layout(&deep).unwrap());
    }

    #[test]
    fn round_trip_is_bit_exact_including_awkward_values() {
        let mut params = init_params(&cfg(), 3);
        let awkward = [f32::MIN_POSITIVE, -0.0, 1e-45, f32::MAX, -f32::MAX, 0.1, 1.0 / 3.0];
        params.values_mut()[..awkward.len()].copy_from_slice(&awkward);
        for device in [flex(), autodiff(flex())] {
            let back = export(&import(Mlp::<Dispatch>::new(&cfg(), &device), &params).unwrap()).unwrap();
            assert_eq!(back.fingerprint(), params.fingerprint());
            assert_eq!(bits(&back), bits(&params));
        }
    }

    #[test]
    fn import_reports_missing_and_misshapen_tensors() {
        let wrong = ParameterSet::from_tensors(vec![
            ("layers.0.weight".into(), vec![32, 4], vec![0.0; 128]),
            ("layers.0.bias".into(), vec![32], vec![0.0; 32]),
        ])
        .unwrap();
        let err = import(Mlp::<Dispatch>::new(&cfg(), &flex()), &wrong).unwrap_err();
        assert!(err.contains("'layers.0.weight' has shape [32, 4]"), "{err}");
        assert!(err.contains("'layers.1.weight' is missing"), "{err}");
    }
}
