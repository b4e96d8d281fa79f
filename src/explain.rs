//! What a refusal means, in plain words: the one table `diagnose` prints after an agent's answer
//! and the agent's Events carry ([`crate::kube::events`]), so the two never disagree.
//!
//! Contract: [`explain`] gives every code the agent answers with (its own and EKS Auth's) its
//! own sentence, and a catch-all for a code it does not know. A code whose meaning depends on
//! whose fault it is (`AccessDeniedException`: the node's permission to call EKS Auth, or the
//! association's role refusing the pod) is told from `side` when the caller knows it (an Event
//! on a pod is the pod's side only, one on the Node the node's); without it (`diagnose`, inside
//! the pod, sees only the code) both causes are named, each in the words its side gets alone.
//! A 403 is always the node's own credentials. No sentence names an account, a role or a token.

use crate::codes::ErrorCode;
use crate::eks_auth::Fault;

/// The node's side of `AccessDeniedException`.
macro_rules! node_may_not_call {
    () => {
        "the node's IAM role may not call eks-auth:AssumeRoleForPodIdentity (add the AmazonEKSWorkerNodePolicy)."
    };
}

/// The pod's side of `AccessDeniedException`: its association's role.
macro_rules! role_does_not_trust {
    () => {
        "the association's role does not trust pods.eks.amazonaws.com with sts:AssumeRole and sts:TagSession (fix the role's trust policy)."
    };
}

/// A refusal in plain words, as `diagnose` prints it after the status and as the agent's Event
/// says it: `<code>: <what it means>`.
pub fn explained(code: &str, status: u16, side: Option<Fault>) -> String {
    format!("{code}: {}", explain(code, status, side))
}

/// What an agent error, by code and status (and whose fault it is, if known), means for the
/// person reading it.
pub fn explain(code: &str, status: u16, side: Option<Fault>) -> &'static str {
    if status == 403 && code != ErrorCode::HostNotAllowed.as_str() {
        // EKS Auth's 403s are about the request's signature: the node's keys, not the pod.
        return "EKS Auth refused the node's own credentials, not the pod's: the node's instance profile or hybrid credentials are wrong or expired, or its clock is off. Every new pod on this node is affected; tell the cluster's operators.";
    }
    match ErrorCode::parse(code) {
        Some(own) => explain_own(own),
        None => explain_eks_auth(code, side),
    }
}

/// The agent's own codes: every one has its sentence (a new code fails to compile here).
fn explain_own(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::MissingToken => "the request carried no token: the SDK did not read the token file (is it too old to support AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE?).",
        ErrorCode::InvalidToken => "the token is not a well-formed service-account token, or it failed the agent's own signature check (--token-issuer).",
        ErrorCode::ExpiredToken => "the token has expired: the kubelet is not renewing the projected token, or the file is a stale copy.",
        ErrorCode::TokenNotYetValid => "the token is not valid yet: the node's clock and the cluster's disagree.",
        ErrorCode::TokenForAnotherNode => "the token belongs to a pod on another node: the agent redeems a token only on its pod's node (--node-name), so this one was copied from elsewhere.",
        ErrorCode::HostNotAllowed => "the request named a host the agent does not serve: use the IP address exactly as in AWS_CONTAINER_CREDENTIALS_FULL_URI.",
        ErrorCode::NotFound => "the URI's path is wrong: credentials are served at /v1/credentials.",
        ErrorCode::MethodNotAllowed => "only GET is answered.",
        ErrorCode::TooManyConnections => "this pod (its IP address) holds too many open connections to the agent; something in it leaks connections.",
        ErrorCode::ConnectionsExhausted => "the agent has no connection to spare (every one is busy, across the node's pods); retry shortly, and if it persists look for a pod holding many connections open.",
        ErrorCode::ExchangeRateExceeded => "this pod asked for new credentials too often (many distinct tokens): the agent limits new exchanges per pod; retry after the Retry-After seconds. Cached credentials are never limited.",
        ErrorCode::ExchangeCapacityExceeded => "the node as a whole is at its limit of new exchanges (many pods starting at once); retry shortly.",
        ErrorCode::ShuttingDown => "the agent is restarting; retry.",
        ErrorCode::EksAuthUnavailable => "the agent cannot reach EKS Auth (eks-auth.<region>.api.aws): check the node's egress, DNS and proxy settings.",
        ErrorCode::EksAuthInvalidResponse => "EKS Auth answered with something that is not credentials; retry, and report it if it persists.",
        ErrorCode::InternalError => "the agent failed internally; its logs say why. Please report it.",
    }
}

/// EKS Auth's codes, as the agent passes them on, and a catch-all.
fn explain_eks_auth(code: &str, side: Option<Fault>) -> &'static str {
    match code {
        "AccessDeniedException" => match side {
            Some(Fault::Node) => node_may_not_call!(),
            Some(Fault::Token) => role_does_not_trust!(),
            _ => concat!("one of two: ", node_may_not_call!(), " Or: ", role_does_not_trust!()),
        },
        "InvalidTokenException" => "EKS Auth rejected the token: it was not issued by this cluster's API server (wrong cluster name in the agent, or a token copied from elsewhere).",
        "ExpiredTokenException" => "EKS Auth says the token has expired: the kubelet is not renewing it, or the node's clock is wrong.",
        "ResourceNotFoundException" => "there is no Pod Identity association for this namespace and service account in this cluster (aws eks list-pod-identity-associations --cluster-name …), or the agent's --cluster-name is wrong.",
        "InvalidParameterException" | "InvalidRequestException" => "EKS Auth refused the request as malformed: check the agent's --cluster-name and version.",
        "UnrecognizedClientException" | "InvalidSignatureException" => "EKS Auth refused the node's own credentials (not the pod's): the node's instance profile or hybrid credentials are wrong or expired.",
        "ThrottlingException" => "EKS Auth is throttling this account: too many exchanges cluster-wide; the SDK will retry.",
        "InternalServerException" | "ServiceUnavailableException" => "EKS Auth failed; retry. Cached credentials keep being served meanwhile.",
        "UnknownError" => "something between the node and EKS Auth (a proxy or gateway) answered instead of EKS Auth: check the node's HTTPS_PROXY and NO_PROXY.",
        _ => "an error this version of diagnose does not know; the agent's message below says more.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the agent answers with, from its own tables (each of its own codes at its
    /// status, each EKS Auth code it knows): each gets its own explanation, as `diagnose` and
    /// the Events print it.
    #[test]
    fn every_error_code_the_agent_can_give_is_explained() {
        let unknown = explain("SomethingNew", 400, None);
        let own = ErrorCode::ALL
            .iter()
            .map(|c| (c.as_str(), c.status().as_u16()));
        let eks_auth = crate::eks_auth::known_codes()
            .chain(["UnknownError"])
            .map(|c| (c, 400));
        for (code, status) in own.chain(eks_auth) {
            assert_ne!(
                explain(code, status, None),
                unknown,
                "{code} is not explained"
            );
        }
        // The same code is the pod's problem at 400 and the node's at 403.
        assert_ne!(
            explain("ExpiredTokenException", 400, None),
            explain("ExpiredTokenException", 403, None)
        );
    }

    /// Each side of a refusal that can be either names only its own cause; not knowing the side
    /// names both, in the same words.
    #[test]
    fn access_denied_names_only_the_side_it_is_on() {
        let code = "AccessDeniedException";
        let node = explain(code, 400, Some(Fault::Node));
        let pod = explain(code, 400, Some(Fault::Token));
        let either = explain(code, 400, None);
        assert!(
            node.contains("node's IAM role") && !node.contains("trust"),
            "{node}"
        );
        assert!(
            pod.contains("trust policy") && !pod.contains("node"),
            "{pod}"
        );
        assert!(either.contains(node) && either.contains(pod), "{either}");
        // Codes with one meaning do not depend on the side.
        for side in [None, Some(Fault::Node), Some(Fault::Token)] {
            assert_eq!(
                explain("ResourceNotFoundException", 400, side),
                explain("ResourceNotFoundException", 400, None)
            );
        }
        // A 403 is the node's credentials whatever the code.
        assert!(explain(code, 403, Some(Fault::Token)).contains("node's own credentials"));
    }
}
