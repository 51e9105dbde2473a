// Command schemacheck decodes every manifest in deploy/k8s strictly into the Kubernetes API's
// own Go types (and the Prometheus Operator's for the PodMonitor and PrometheusRule): a
// misspelt field, a field at the wrong level or a value of the wrong type is an error, as the
// API server would reject it. No cluster runs where sluice is built, so this stands in for `kubectl apply
// --dry-run=server`. Kinds without vendored types (KEDA's ScaledObject) are named as
// unchecked; tests/tests/deploy_config.rs checks their fields that matter.
//
// Usage (from this folder): go run . ..   (tests/tests/deploy_config.rs does)
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"
)

// types maps "apiVersion kind" to a constructor of the typed object it must decode into.
var types = map[string]func() any{
	"v1 Namespace":                            func() any { return &corev1.Namespace{} },
	"v1 ConfigMap":                            func() any { return &corev1.ConfigMap{} },
	"v1 Secret":                               func() any { return &corev1.Secret{} },
	"v1 Service":                              func() any { return &corev1.Service{} },
	"apps/v1 Deployment":                      func() any { return &appsv1.Deployment{} },
	"batch/v1 Job":                            func() any { return &batchv1.Job{} },
	"batch/v1 CronJob":                        func() any { return &batchv1.CronJob{} },
	"autoscaling/v2 HorizontalPodAutoscaler":  func() any { return &autoscalingv2.HorizontalPodAutoscaler{} },
	"networking.k8s.io/v1 NetworkPolicy":      func() any { return &networkingv1.NetworkPolicy{} },
	"policy/v1 PodDisruptionBudget":           func() any { return &policyv1.PodDisruptionBudget{} },
	"monitoring.coreos.com/v1 PodMonitor":     func() any { return &monitoringv1.PodMonitor{} },
	"monitoring.coreos.com/v1 PrometheusRule": func() any { return &monitoringv1.PrometheusRule{} },
}

// unchecked are kinds we know and deliberately do not decode (their Go types would pull in a
// whole operator's dependency tree).
var unchecked = map[string]bool{
	"keda.sh/v1alpha1 ScaledObject": true,
}

var separator = regexp.MustCompile(`(?m)^---\s*$`)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: schemacheck DIR")
		os.Exit(2)
	}
	files, err := filepath.Glob(filepath.Join(os.Args[1], "*.yaml"))
	if err != nil || len(files) == 0 {
		fmt.Fprintf(os.Stderr, "no manifests in %s\n", os.Args[1])
		os.Exit(2)
	}
	sort.Strings(files)
	failed := false
	for _, file := range files {
		if filepath.Base(file) == "kustomization.yaml" {
			continue
		}
		text, err := os.ReadFile(file)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", file, err)
			failed = true
			continue
		}
		for i, doc := range separator.Split(string(text), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			if err := check([]byte(doc)); err != nil {
				fmt.Fprintf(os.Stderr, "%s (document %d): %v\n", file, i+1, err)
				failed = true
			}
		}
	}
	if failed {
		os.Exit(1)
	}
	fmt.Println("all manifests decode strictly")
}

func check(doc []byte) error {
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name string `json:"name"`
		} `json:"metadata"`
	}
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		return fmt.Errorf("not YAML: %w", err)
	}
	key := meta.APIVersion + " " + meta.Kind
	if unchecked[key] {
		fmt.Printf("unchecked: %s %s\n", key, meta.Metadata.Name)
		return nil
	}
	newObj, ok := types[key]
	if !ok {
		return fmt.Errorf("unknown apiVersion/kind %q: add its type to schemacheck", key)
	}
	if err := yaml.UnmarshalStrict(doc, newObj()); err != nil {
		return fmt.Errorf("%s %s: %w", key, meta.Metadata.Name, err)
	}
	fmt.Printf("ok: %s %s\n", key, meta.Metadata.Name)
	return nil
}

func stripComments(doc string) string {
	var out []string
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
