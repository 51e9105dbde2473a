// Command schemacheck loads deploy/compose/docker-compose.yml with compose-go, the loader
// `docker compose` itself uses: the file is validated against the Compose specification's
// schema, anchors and merge keys are applied, and relative paths resolved, exactly as
// `docker compose config` would. No container engine runs where sluice is built, so this
// stands in for it. It prints each service's resolved command and environment as JSON.
//
// Usage (from this folder): go run . ../docker-compose.yml   (tests/tests/deploy_config.rs does)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: schemacheck COMPOSE_FILE")
		os.Exit(2)
	}
	opts, err := cli.NewProjectOptions(
		[]string{os.Args[1]},
		cli.WithName("sluice"),
		// Interpolation must not depend on the caller's environment.
		cli.WithEnv([]string{}),
	)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	type service struct {
		Command     []string           `json:"command"`
		Environment map[string]*string `json:"environment"`
	}
	out := map[string]service{}
	for name, svc := range project.Services {
		out[name] = service{Command: svc.Command, Environment: svc.Environment}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
