// Command schemacheck loads deploy/compose/docker-compose.yml with compose-go, the loader
// `docker compose` itself uses: the file is validated against the Compose specification's
// schema, anchors and merge keys are applied, and relative paths resolved, exactly as
// `docker compose config` would. No container engine runs where sluice is built, so this
// stands in for it. Each Dockerfile a service builds is parsed and linted with BuildKit's own
// Dockerfile frontend (instructions, flags such as RUN --mount, COPY --from stages; lint
// warnings count as errors). It prints each service's resolved command and environment as
// JSON.
//
// Usage (from this folder): go run . ../docker-compose.yml   (tests/tests/deploy_config.rs does)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"path/filepath"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: schemacheck COMPOSE_FILE")
		os.Exit(2)
	}
	opts, err := cli.NewProjectOptions(
		[]string{os.Args[1]},
		cli.WithName("sluice"),
		// Services behind a profile (the seed tool) are checked too.
		cli.WithProfiles([]string{"*"}),
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
	dockerfiles := map[string]bool{}
	for _, svc := range project.Services {
		if svc.Build == nil {
			continue
		}
		path := svc.Build.Dockerfile
		if path == "" {
			path = "Dockerfile"
		}
		if !filepath.IsAbs(path) {
			path = filepath.Join(svc.Build.Context, path)
		}
		dockerfiles[path] = true
	}
	var paths []string
	for path := range dockerfiles {
		paths = append(paths, path)
	}
	sort.Strings(paths)
	for _, path := range paths {
		if err := checkDockerfile(path); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			os.Exit(1)
		}
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

// checkDockerfile parses a Dockerfile as BuildKit does and fails on any lint warning, or on a
// COPY --from naming neither an earlier stage nor an image reference with a tag.
func checkDockerfile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	ast, err := parser.Parse(f)
	if err != nil {
		return err
	}
	var warnings []string
	for _, w := range ast.Warnings {
		warnings = append(warnings, w.Short)
	}
	lint := linter.New(&linter.Config{Warn: func(rule, _, _, msg string, loc []parser.Range) {
		line := 0
		if len(loc) > 0 {
			line = loc[0].Start.Line
		}
		warnings = append(warnings, fmt.Sprintf("line %d: %s: %s", line, rule, msg))
	}})
	stages, _, err := instructions.Parse(ast.AST, lint)
	if err != nil {
		return err
	}
	names := map[string]bool{}
	for _, stage := range stages {
		for _, cmd := range stage.Commands {
			if c, ok := cmd.(*instructions.CopyCommand); ok && c.From != "" && !names[strings.ToLower(c.From)] {
				warnings = append(warnings, fmt.Sprintf("stage %q: COPY --from=%s names no earlier stage", stage.Name, c.From))
			}
		}
		names[strings.ToLower(stage.Name)] = true
	}
	if len(warnings) > 0 {
		return fmt.Errorf("%s", strings.Join(warnings, "; "))
	}
	fmt.Fprintf(os.Stderr, "%s: %d stages parse and lint clean\n", path, len(stages))
	return nil
}
