//! Where objects come from: a manifests directory, or the Kubernetes API. Both hand the model
//! the same [`crate::model::Objects`].
pub mod kube;
pub mod manifests;
