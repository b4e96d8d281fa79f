//! `--from-cluster`: copy a real cluster's Pod Identity associations into the emulator, so local
//! runs mirror production.
//!
//! Contract: lists every association of the cluster (`ListPodIdentityAssociations`, all pages)
//! and describes each (`DescribePodIdentityAssociation`) for its role, target role and session
//! tag setting, with the caller's own AWS credentials and region. The EKS endpoint follows the
//! SDK's overrides (`AWS_ENDPOINT_URL_EKS`), which is how tests use a local fake. Any failure is
//! an error naming the call; the emulator does not start with half a table.

use super::associations::{Association, Associations};
use aws_sdk_eks::error::ProvideErrorMetadata;

pub async fn from_cluster(cluster: &str) -> Result<Associations, String> {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    if sdk.region().is_none() {
        return Err("--from-cluster needs a region: set AWS_REGION".into());
    }
    let client = aws_sdk_eks::Client::new(&sdk);
    let mut summaries = Vec::new();
    let mut pages = client
        .list_pod_identity_associations()
        .cluster_name(cluster)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| failure(&e, "ListPodIdentityAssociations", cluster))?;
        summaries.extend(
            page.associations()
                .iter()
                .filter_map(|a| a.association_id().map(str::to_owned)),
        );
    }
    let mut list = Vec::with_capacity(summaries.len());
    for id in summaries {
        let out = client
            .describe_pod_identity_association()
            .cluster_name(cluster)
            .association_id(&id)
            .send()
            .await
            .map_err(|e| failure(&e, "DescribePodIdentityAssociation", cluster))?;
        let Some(a) = out.association() else { continue };
        list.push(Association {
            namespace: a.namespace().unwrap_or_default().to_owned(),
            service_account: a.service_account().unwrap_or_default().to_owned(),
            role_arn: a.role_arn().unwrap_or_default().to_owned(),
            target_role_arn: a.target_role_arn().map(str::to_owned),
            disable_session_tags: a.disable_session_tags().unwrap_or(false),
            association_id: Some(id),
        });
    }
    tracing::info!(
        cluster,
        associations = list.len(),
        "imported Pod Identity associations"
    );
    Ok(Associations::Table(list))
}

fn failure(e: &impl ProvideErrorMetadata, call: &str, cluster: &str) -> String {
    format!(
        "{call} for cluster {cluster} failed: {} {}",
        e.code()
            .unwrap_or("error (no code; is the endpoint reachable?)"),
        e.message().unwrap_or("")
    )
}
